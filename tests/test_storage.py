"""The storage layer against local disk and a real S3-compatible server on loopback."""

import os

import pytest

from rsdiff import storage
from rsdiff.errors import StorageError

pytestmark = pytest.mark.unit


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("bucket") + "/prefix"


def test_roundtrip_list_glob_delete(root):
    storage.write_text(storage.join(root, "a/x.json"), "{}")
    storage.write_bytes(storage.join(root, "a/y.tar"), b"123")
    storage.write_bytes(storage.join(root, "b/z.tar"), b"4567")
    assert storage.read_bytes(storage.join(root, "b/z.tar")) == b"4567"
    with storage.open_stream(storage.join(root, "a/y.tar")) as s:
        assert s.read() == b"123"
    assert [storage.name(u) for u in storage.list_uris(root, ".tar")] == ["y.tar", "z.tar"]
    assert [storage.name(u) for u in storage.glob(storage.join(root, "*/*.tar"))] == ["y.tar", "z.tar"]
    assert storage.exists(storage.join(root, "a/x.json"))
    storage.delete(storage.join(root, "a/x.json"))
    assert not storage.exists(storage.join(root, "a/x.json"))
    with pytest.raises(storage.NotFoundError, match="no such"):
        storage.read_bytes(storage.join(root, "a/x.json"))


def test_failed_write_leaves_nothing(root):
    target = storage.join(root, "out/file.bin")
    with pytest.raises(RuntimeError), storage.atomic_local_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert not storage.exists(target)
    assert storage.list_uris(storage.join(root, "out")) == []


def test_local_copy_and_download(root, tmp_path):
    uri = storage.join(root, "scene.bin")
    storage.write_bytes(uri, b"pixels")
    with storage.local_copy(uri) as path:
        assert path.read_bytes() == b"pixels"
    assert storage.download(uri, tmp_path / "d" / "s.bin").read_bytes() == b"pixels"


def test_missing_bucket_is_a_clear_error(s3_endpoint):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-rsdiff' does not exist"):
        storage.check_writable("s3://no-such-bucket-rsdiff/out")
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_bytes("s3://no-such-bucket-rsdiff/a")


def test_unreachable_endpoint_is_retried_then_named(s3_endpoint, monkeypatch):
    from conftest import free_port

    storage._client_for_pid.cache_clear()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("RSDIFF_S3_MAX_ATTEMPTS", "2")
    try:
        with pytest.raises(StorageError, match="unreachable") as err:
            storage.read_bytes("s3://any/key")
        assert "rsdiffTestSecret" not in str(err.value)
    finally:
        monkeypatch.undo()
        storage._client_for_pid.cache_clear()


def test_keys_the_store_refuses_are_renewed_from_the_credential_chain(bucket, monkeypatch):
    """The store starts refusing the keys the process's S3 client signs with (an expired token)
    while the credential chain now gives new ones (a rotated profile, re-exported keys): reads,
    existence checks and writes take the new keys and go on. Keys nobody renewed stay an error."""
    from s3_fault_proxy import FaultyS3Proxy

    uri = storage.join(bucket, "a/x.bin")
    storage.write_bytes(uri, b"before")
    with FaultyS3Proxy(os.environ["AWS_ENDPOINT_URL"], max_faults=0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        storage._client_for_pid.cache_clear()
        try:
            assert storage.read_bytes(uri) == b"before"  # the client now signs with the first keys
            proxy.expired_keys.add(os.environ["AWS_ACCESS_KEY_ID"])
            with pytest.raises(storage.AccessError, match=r"cannot read .*x\.bin"):
                storage.exists(uri)  # nothing renewed: the refusal is the answer
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIARSDIFFRENEWED0003")
            monkeypatch.setenv("AWS_SESSION_TOKEN", "renewed-token")
            assert storage.exists(uri) and storage.read_bytes(uri) == b"before"
            storage.write_bytes(uri, b"after")
            assert storage.read_bytes(uri) == b"after"
            assert proxy.refused_by_client["boto3"] == 2  # once before the renewal, once at it
        finally:
            storage._client_for_pid.cache_clear()


GLOB_TREE = ["a/x.tar", "a/y.tar", "a/.hidden.tar", "a/sub/deep.tar", "a/sub/more/deeper.tar", "b/z.tar",
             "b/z.json", "top.tar"]  # fmt: skip


@pytest.mark.parametrize(
    "pattern",
    ["a/*.tar", "*/*.tar", "*.tar", "**/*.tar", "a/**/*.tar", "a/**", "a/?.tar", "a/[xy].tar", "a/[!x].tar",
     "a/sub/*/*.tar", "*/z.*", "a/*/deep.tar"],
)  # fmt: skip
def test_s3_globs_match_exactly_what_local_globs_match(pattern, bucket, tmp_path):
    """``*``/``?``/``[..]`` stay inside one folder and skip hidden names, ``**`` crosses folders: on
    S3 as on disk (an S3 ``*`` that crossed folders would ingest scenes nobody asked for)."""
    local, remote = str(tmp_path / "tree"), f"{bucket}/tree"
    for key in GLOB_TREE:
        storage.write_bytes(storage.join(local, key), b"x")
        storage.write_bytes(storage.join(remote, key), b"x")
    want = [u[len(local) + 1 :] for u in storage.glob(storage.join(local, pattern))]
    got = [u[len(remote) + 1 :] for u in storage.glob(storage.join(remote, pattern))]
    assert got == want and want, (pattern, got, want)
