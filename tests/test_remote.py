"""The shared remote cache: a file:// folder and a real S3 API (moto) on loopback."""

from __future__ import annotations

import json
import shutil

import pytest

from engine_helpers import Project, counted

PIPELINE = f"""
[target.weights]
kind = "command"
cmd = "{counted('weights', 'head -c 1500000 /dev/urandom > $TUNEMAKE_OUT/w.bin; cp data/cfg.json $TUNEMAKE_OUT/')}"
deps = ["data/cfg.json"]

[target.summary]
kind = "command"
cmd = "{counted('summary', 'sha256sum $TUNEMAKE_DEP_WEIGHTS/w.bin | cut -c1-16 > $TUNEMAKE_OUT/sum.txt')}"
deps = ["weights"]
"""


def make_clone(tmp_path, name: str, extra: str = "") -> Project:
    root = tmp_path / name
    (root / "runs").mkdir(parents=True)
    p = Project(root)
    p.write("data/cfg.json", '{"dim": 64}\n')
    p.tunefile(extra + PIPELINE)
    return p


def files_of(p: Project) -> dict[str, bytes]:
    base = p.root / "targets"
    return {str(f.relative_to(base)): f.read_bytes() for f in sorted(base.rglob("*")) if f.is_file()}


def test_file_remote_shares_builds_between_clones(tmp_path):
    remote = f"file://{tmp_path / 'remote'}"
    a = make_clone(tmp_path, "a")
    a.build("--remote", remote)
    assert a.runs("weights") == 1
    b = make_clone(tmp_path, "b")
    out = b.build("--remote", remote).stdout
    assert "2 restored from cache" in out and "from the remote cache" in out
    assert b.runs("weights") == 0 and b.runs("summary") == 0
    assert files_of(a) == files_of(b)


def test_remote_from_tunefile_and_env(tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    a = make_clone(tmp_path, "a", f'[cache]\nremote = "file://{remote}"\n')
    a.build()
    b = make_clone(tmp_path, "b")
    b.build(env={"TUNEMAKE_REMOTE": f"file://{remote}"})
    assert b.runs("weights") == 0


def test_tampered_remote_blob_is_detected_and_rebuilt(tmp_path):
    remote = tmp_path / "remote"
    a = make_clone(tmp_path, "a")
    a.build("--remote", f"file://{remote}")
    blobs = sorted((remote / "cas").glob("*/*"), key=lambda f: f.stat().st_size)
    biggest = blobs[-1]
    biggest.write_bytes(b"tampered" + biggest.read_bytes()[8:])
    b = make_clone(tmp_path, "b")
    proc = b.build("--remote", f"file://{remote}")
    assert "failed verification" in proc.stdout + proc.stderr
    assert b.runs("weights") == 1  # rebuilt, not served
    assert b.read("targets/weights/cfg.json") == '{"dim": 64}\n'
    assert b.run("cache", "verify").returncode == 0


def test_unsafe_manifest_path_is_refused(tmp_path):
    remote = tmp_path / "remote"
    a = make_clone(tmp_path, "a")
    a.build("--remote", f"file://{remote}")
    for action in (remote / "ac").glob("*/*.json"):
        entry = json.loads(action.read_text())
        if entry["target"] == "weights":
            entry["outputs"]["../../escaped.txt"] = entry["outputs"]["cfg.json"]
            action.write_text(json.dumps(entry))
    b = make_clone(tmp_path, "b")
    proc = b.build("--remote", f"file://{remote}")
    assert "unsafe output path" in proc.stdout + proc.stderr
    assert not (tmp_path / "escaped.txt").exists() and not (b.root / "escaped.txt").exists()
    assert b.runs("weights") == 1


def test_read_only_never_publishes_and_push_pull(tmp_path):
    remote = tmp_path / "remote"
    a = make_clone(tmp_path, "a")
    a.build("--remote", f"file://{remote}", "--no-push")
    assert not remote.exists() or not list(remote.rglob("*.json"))
    proc = a.run("cache", "push", "--remote", f"file://{remote}", check=True)
    assert "pushed 2 targets" in proc.stdout
    b = make_clone(tmp_path, "b")
    proc = b.run("cache", "pull", "--remote", f"file://{remote}", check=True)
    assert "pulled 2" in proc.stdout
    assert files_of(a) == files_of(b)
    assert b.runs("weights") == 0


def test_unreachable_remote_degrades_to_a_local_build(tmp_path):
    options = ('[cache]\nremote = "s3://bucket/cache"\n'
               'remote_options = {key = "k", secret = "s", retries = 1, '
               'client_kwargs = {endpoint_url = "http://127.0.0.1:9"}, '
               'config_kwargs = {connect_timeout = 1, retries = {max_attempts = 1}}}\n')
    a = make_clone(tmp_path, "a", options)
    proc = a.build(timeout=120)
    assert "warning: remote cache s3://bucket/cache unavailable" in proc.stdout + proc.stderr
    assert a.runs("weights") == 1
    assert "nothing to do" in a.build().stdout


@pytest.fixture
def s3_server():
    moto_server = pytest.importorskip("moto.server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                 region_name="us-east-1").create_bucket(Bucket="team-cache")
    yield endpoint
    server.stop()


def test_s3_remote_on_loopback(tmp_path, s3_server):
    options = (f'[cache]\nremote = "s3://team-cache/tunemake"\n'
               f'remote_options = {{key = "k", secret = "s", client_kwargs = {{endpoint_url = "{s3_server}", '
               f'region_name = "us-east-1"}}}}\n')
    a = make_clone(tmp_path, "a", options)
    a.build()
    b = make_clone(tmp_path, "b", options)
    out = b.build().stdout
    assert "2 restored from cache" in out
    assert b.runs("weights") == 0
    assert files_of(a) == files_of(b)
    shutil.rmtree(b.root / "targets")
    shutil.rmtree(b.root / ".tunecache")
    assert "2 restored from cache" in b.build().stdout
