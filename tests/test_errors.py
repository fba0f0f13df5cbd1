"""Bad input: exit code 2 and one line naming the file, line, target and field. Never a traceback."""

from __future__ import annotations

import pytest
from engine_helpers import assert_one_line_error

GOOD = """
[target.a]
kind = "command"
cmd = "echo a > $TUNEMAKE_OUT/a"
"""

CASES = {
    "toml syntax": ('[target.a]\nkind = "command"\ncmd = "x\n', ["tunefile.toml:3", "TOML syntax error"]),
    "unknown kind": ('[target.a]\nkind = "comand"\n', ["tunefile.toml:2", "target 'a'", "field 'kind'",
                                                       "unknown kind 'comand'", "command"]),
    "missing kind": ('[target.a]\ncmd = "x"\n', ["tunefile.toml:1", "target 'a'", "field 'kind'", "missing"]),
    "unknown param": ('[target.a]\nkind = "command"\ncmd = "x"\ngroupsize = 3\n',
                      ["tunefile.toml:4", "target 'a'", "field 'groupsize'", "unknown field", "cmd"]),
    "mistyped param": ('[target.a]\nkind = "command"\ncmd = "x"\ngpus = "two"\n',
                       ["tunefile.toml:4", "target 'a'", "field 'gpus'", "integer"]),
    "undefined dep": ('[target.a]\nkind = "command"\ncmd = "x"\ndeps = ["b"]\n[target.bb]\nkind = "command"\ncmd = "x"\n',
                      ["tunefile.toml:4", "target 'a'", "field 'deps'", "'b' is neither a target nor an existing path",
                       "did you mean 'bb'"]),
    "missing source": ('[target.a]\nkind = "command"\ncmd = "x"\ndeps = ["data/none.txt"]\n',
                       ["tunefile.toml:4", "field 'deps'", "'data/none.txt'"]),
    "cycle": ('[target.a]\nkind = "command"\ncmd = "x"\ndeps = ["b"]\n'
              '[target.b]\nkind = "command"\ncmd = "x"\ndeps = ["c"]\n'
              '[target.c]\nkind = "command"\ncmd = "x"\ndeps = ["a"]\n', ["dependency cycle: ", "a -> b -> c -> a"]),
    "undefined var": ('[target.a]\nkind = "command"\ncmd = "echo ${vars.nope}"\n',
                      ["tunefile.toml:3", "field 'cmd'", "${vars.nope} is not defined"]),
    "vars cycle": ('[vars]\na = "${vars.b}"\nb = "x${vars.a}"\n' + GOOD,
                   ["tunefile.toml:2", "field 'vars.a'", "vars refer to each other: a -> b -> a"]),
    "undefined var in vars": ('[vars]\na = "${vars.zz}"\n' + GOOD,
                              ["tunefile.toml:2", "field 'vars.a'", "${vars.zz} is not defined"]),
    "matrix in vars": ('[vars]\nlabel = "run-${matrix.size}"\n' + GOOD,
                       ["tunefile.toml:2", "field 'vars.label'", "${matrix.…} cannot be used in vars"]),
    "bad default": ('default = ["zz"]\n' + GOOD, ["tunefile.toml:1", "field 'default'", "unknown target 'zz'"]),
    "unknown top-level": ('colour = 1\n' + GOOD, ["tunefile.toml:1", "unknown top-level key"]),
    "bad outs": ('[target.a]\nkind = "command"\ncmd = "x"\nouts = ["../escape"]\n',
                 ["tunefile.toml:4", "field 'outs'", "relative path inside the output folder"]),
    "bad cache link": ('[cache]\nlink = "teleport"\n' + GOOD, ["tunefile.toml:2", "field 'cache.link'"]),
    "vars not a table": ('vars = 5\n' + GOOD, ["tunefile.toml:1", "field 'vars'", "must be a table"]),
    "kind not a string": ('[target.a]\nkind = ["command"]\n', ["tunefile.toml:2", "field 'kind'", "must be a string"]),
    "name too long": (f'[target.{"x" * 200}]\nkind = "command"\ncmd = "x"\n', ["at most 120 characters"]),
    "matrix name collision": ('[target.m]\nkind = "command"\ncmd = "x"\nmatrix = {v = [1, "1"]}\n',
                              ["field 'matrix'", "two targets would be named 'm@1'"]),
    "outs dot": ('[target.a]\nkind = "command"\ncmd = "x"\nouts = ["."]\n', ["field 'outs'"]),
    "source inside targets": ('[target.a]\nkind = "command"\ncmd = "x"\n[target.b]\nkind = "command"\n'
                              'cmd = "x"\ndeps = ["targets/a"]\n', ["name the target instead"]),
    "dep env names collide": ('[target.a-b]\nkind = "command"\ncmd = "x"\n[target.a_b]\nkind = "command"\ncmd = "x"\n'
                              '[target.c]\nkind = "command"\ncmd = "x"\ndeps = ["a-b", "a_b"]\n',
                              ["tunefile.toml:10", "target 'c'", "field 'deps'", "would share $TUNEMAKE_DEP_A_B"]),
    "python kind missing module": ('[target.a]\nkind = "python"\nfunction = "no_such_mod:fn"\n',
                                   ["tunefile.toml:3", "field 'function'", "module 'no_such_mod' not found"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_tunefile(project, case):
    text, expected = CASES[case]
    project.tunefile(text)
    for command in (["build"], ["status"]):
        assert_one_line_error(project.run(*command, check=False), expected)


@pytest.mark.parametrize("args, expected", [
    (["build", "--set", "a"], ["--set 'a'", "NAME.param=value"]),
    (["build", "--set", "zz.cmd=x"], ["no target 'zz'"]),
    (["build", "--set", "a.cmdd=x"], ["target 'a'", "field 'cmdd'", "unknown field", "(from --set)"]),
    (["build", "--set", "a.gpus=lots"], ["field 'gpus'", "(from --set)"]),
    (["build", "nosuch"], ["unknown target 'nosuch'"]),
    (["explain", "nosuch"], ["unknown target 'nosuch'"]),
    (["build", "-j", "0"], ["-j 0"]),
    (["cache", "gc", "--max-size", "lots"], ["--max-size 'lots'"]),
    (["cache", "gc", "--max-size", "1.2.3GB"], ["--max-size '1.2.3GB'"]),
])
def test_bad_command_line(project, args, expected):
    project.tunefile(GOOD)
    assert_one_line_error(project.run(*args, check=False), expected)


def test_missing_tunefile(tmp_path):
    from engine_helpers import Project

    empty = Project(tmp_path / "nowhere")
    (tmp_path / "nowhere").mkdir()
    assert_one_line_error(empty.run("build", check=False), ["tunefile.toml", "no tunefile here"])


def test_a_fixed_tunefile_builds_after_an_error(project):
    project.tunefile('[target.a]\nkind = "command"\ncmd = "x"\ngroupsize = 3\n')
    assert project.run("build", check=False).returncode == 2
    project.tunefile(GOOD)
    project.build()
    assert project.read("targets/a/a") == "a\n"
