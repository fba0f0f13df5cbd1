"""More bad input: misspelled fields, unknown --set vars, bad env names, names with a newline,
deep nesting, a cache folder that would endanger the project. Exit code 2 and one line, always."""

from __future__ import annotations

import pytest
from engine_helpers import assert_one_line_error

GOOD = """
[target.a]
kind = "command"
cmd = "echo a > $TUNEMAKE_OUT/a"
"""

DEEP = "[" * 700 + "]" * 700  # tomllib itself recurses too deeply
DEEPISH = "[" * 100 + "]" * 100  # parses, but deeper than tunemake accepts


CASES = {
    "misspelled required field": ('[target.a]\nkind = "command"\ncmmd = "echo"\n',
                                  ["tunefile.toml:3", "target 'a'", "field 'cmmd'", "unknown field",
                                   "did you mean 'cmd'?", "valid fields: kind, cmd, deps"]),
    "misspelled cache field": ('[cache]\ndri = ".c"\n' + GOOD,
                               ["tunefile.toml:2", "field 'cache.dri'", "unknown field", "did you mean 'dir'?",
                                "valid fields: dir, link"]),
    "env name with a dash": ('[target.a]\nkind = "command"\ncmd = "x"\nenv = {"A-B" = "x"}\n',
                             ["tunefile.toml:4", "target 'a'", "field 'env'", "'A-B'", "shell identifier"]),
    "env name with a digit first": ('[target.a]\nkind = "command"\ncmd = "x"\nenv = {"1A" = "x"}\n',
                                    ["tunefile.toml:4", "field 'env'", "'1A'", "shell identifier"]),
    "empty env name": ('[target.a]\nkind = "command"\ncmd = "x"\nenv = {"" = "x"}\n',
                       ["tunefile.toml:4", "field 'env'", "''", "shell identifier"]),
    "env name ending in a newline": ('[target.a]\nkind = "command"\ncmd = "x"\nenv = {"A\\n" = "x"}\n',
                                     ["tunefile.toml:4", "field 'env'", "shell identifier"]),
    "env name tunemake sets": ('[target.a]\nkind = "command"\ncmd = "x"\nenv = {TUNEMAKE_OUT = "x"}\n',
                               ["tunefile.toml:4", "field 'env'", "'TUNEMAKE_OUT'", "TUNEMAKE_"]),
    "target name ending in a newline": ('[target."a\\n"]\nkind = "command"\ncmd = "x"\n',
                                        ["target 'a\\n'", "target names may use letters"]),
    "matrix value ending in a newline": ('[target.m]\nkind = "command"\ncmd = "x"\nmatrix = {v = ["x\\n"]}\n',
                                         ["tunefile.toml:4", "target 'm'", "field 'matrix'",
                                          "does not make a valid target name"]),
    "function ending in a newline": ('[target.a]\nkind = "python"\nfunction = "mod:fn\\n"\n',
                                     ["tunefile.toml:3", "target 'a'", "field 'function'",
                                      "not of the form package.module:function"]),
    "very deep value in a target": (f'[target.a]\nkind = "command"\ncmd = "x"\nx = {DEEP}\n',
                                    ["tunefile.toml", "nested too deeply (more than 64 levels)"]),
    "very deep value in vars": (f'[vars]\nx = {DEEP}\n' + GOOD, ["tunefile.toml", "nested too deeply"]),
    "deep value in a target": (f'[target.a]\nkind = "command"\ncmd = "x"\nx = {DEEPISH}\n',
                               ["tunefile.toml:4", "target 'a'", "field 'x'", "nested too deeply (more than 64 levels)"]),
    "deep value in vars": (f'[vars]\nx = {DEEPISH}\n' + GOOD,
                           ["tunefile.toml:2", "field 'vars.x'", "nested too deeply"]),
    "deep inline table in vars": ('[vars]\nx = ' + "{a = " * 100 + "1" + "}" * 100 + "\n" + GOOD,
                                  ["tunefile.toml:2", "field 'vars.x'", "nested too deeply"]),
    "cache table not a table": ('cache = 5\n' + GOOD, ["tunefile.toml:1", "field 'cache'", "must be a table"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_tunefile(project, case):
    text, expected = CASES[case]
    project.tunefile(text)
    project.write("mod.py", "def fn(ctx):\n    pass\n")  # for the python kind: only the function name is wrong
    for command in (["build"], ["status"]):
        assert_one_line_error(project.run(*command, check=False), expected)


def test_cache_field_suggestions_do_not_offer_kind(project):
    project.tunefile('[cache]\ndri = ".c"\n' + GOOD)
    line = assert_one_line_error(project.run("build", check=False), ["field 'cache.dri'"])
    assert "kind" not in line


def test_unknown_field_is_reported_even_beside_a_bad_value(project):
    project.tunefile('[target.a]\nkind = "command"\ncmmd = "echo"\ngpus = "two"\n')
    assert_one_line_error(project.run("build", check=False), ["field 'cmmd'", "did you mean 'cmd'?"])


@pytest.mark.parametrize("args, expected", [
    (["--set", "vars.stpes=5"], ["--set vars.stpes", "no var 'stpes' in tunefile.toml", "did you mean 'steps'?"]),
    (["--set", "vars.zz=5"], ["--set vars.zz", "no var 'zz' in tunefile.toml", "steps"]),
    (["--set", f"a.x={DEEP}"], ["--set a.x", "nested too deeply (more than 64 levels)"]),
    (["--set", f"vars.steps={DEEPISH}"], ["--set vars.steps", "nested too deeply"]),
])
def test_bad_set(project, args, expected):
    project.tunefile('[vars]\nsteps = 10\n' + GOOD)
    assert_one_line_error(project.run("build", *args, check=False), expected)


def test_set_of_a_known_var_still_works(project):
    project.tunefile('[vars]\nword = "x"\n[target.a]\nkind = "command"\ncmd = "echo ${vars.word} > $TUNEMAKE_OUT/a"\n')
    project.build("--set", "vars.word=y")
    assert project.read("targets/a/a") == "y\n"


def test_env_names_that_are_identifiers_reach_the_command(project):
    project.tunefile('[target.a]\nkind = "command"\ncmd = "echo $_A1 $b > $TUNEMAKE_OUT/a"\n'
                     'env = {_A1 = "x", b = "y"}\n')
    project.build()
    assert project.read("targets/a/a") == "x y\n"


@pytest.mark.parametrize("cache_dir, expected", [
    (".", "project folder"),
    ("./", "project folder"),
    ("..", "project folder"),
    ("sub/..", "project folder"),
    ("targets", "targets/"),
    ("targets/c", "targets/"),
    ("./targets/../targets/c", "targets/"),
    ("linked", "targets/"),
    ("afile", "not a folder"),
])
def test_cache_dir_that_would_endanger_the_project(project, cache_dir, expected):
    (project.root / "targets").mkdir()
    (project.root / "linked").symlink_to("targets")
    (project.root / "afile").write_text("x")
    (project.root / "tmp").mkdir()
    (project.root / "tmp" / "mine").write_text("keep me")
    project.tunefile(f'[target.a]\nkind = "command"\ncmd = "x"\n\n[cache]\nlink = "copy"\ndir = "{cache_dir}"\n')
    for command in (["build"], ["status"], ["cache", "gc"]):
        assert_one_line_error(project.run(*command, check=False),
                               ["tunefile.toml:7", "field 'cache.dir'", f"'{cache_dir}'", expected])
    assert project.read("tmp/mine") == "keep me"


def test_cache_dir_in_a_subfolder_is_used(project):
    project.tunefile(GOOD + '[cache]\ndir = "sub/cache"\n')
    project.build()
    assert (project.root / "sub" / "cache" / "cas").is_dir()
    assert not (project.root / ".tunecache" / "cas").exists()
    project.run("cache", "gc", check=True)
    assert project.read("targets/a/a") == "a\n"


def test_cache_dir_outside_the_project_is_allowed(project, tmp_path_factory):
    outside = tmp_path_factory.mktemp("shared-cache")
    for cache_dir, where in ((f"../{project.root.name}-cache", project.root.parent / f"{project.root.name}-cache"),
                             (str(outside), outside)):
        project.tunefile(GOOD + f'[cache]\ndir = "{cache_dir}"\n')
        project.build()
        assert (where / "cas").is_dir()


@pytest.mark.parametrize("source", ["build/cache/x", "./build/cache/x", "build/cache", "./targets/x", "targets"])
def test_source_inside_a_multi_part_cache_dir_or_targets_is_refused(project, source):
    project.write("build/cache/x", "x")
    project.write("targets/x", "x")
    project.tunefile(f'[target.a]\nkind = "command"\ncmd = "x"\ndeps = ["{source}"]\n\n[cache]\ndir = "./build/cache"\n')
    assert_one_line_error(project.run("build", check=False),
                           ["tunefile.toml:4", "target 'a'", "field 'deps'", "which tunemake manages"])


def test_source_beside_a_multi_part_cache_dir_is_allowed(project):
    project.write("build/other", "o\n")
    project.tunefile('[target.a]\nkind = "command"\ncmd = "cat build/other > $TUNEMAKE_OUT/a"\n'
                     'deps = ["build/other"]\n\n[cache]\ndir = "build/cache"\n')
    project.build()
    assert project.read("targets/a/a") == "o\n"
