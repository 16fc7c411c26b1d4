"""Scenes in S3 read by window through GDAL, against the loopback S3 server behind a counting (and,
where asked, failing) proxy: the same pixels as a local read, only the bytes a window needs, the
header alone for a probe, and failures retried or named."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from s3_fault_proxy import FaultyS3Proxy

from rsdiff import storage
from rsdiff.data.scenes import SceneReader, SceneRef
from rsdiff.errors import DataError, StorageError

pytestmark = pytest.mark.unit

SIZE = 1024


def _scene(path: Path, tiled: bool) -> np.ndarray:
    """A 3-band uint8 GeoTIFF of noise (incompressible: bytes read track pixels read)."""
    pixels = np.random.default_rng(0).integers(0, 255, (3, SIZE, SIZE), dtype=np.uint8)
    layout = {"tiled": True, "blockxsize": 128, "blockysize": 128} if tiled else {"tiled": False}
    with rasterio.open(
        path, "w", driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="uint8", crs="EPSG:32640",
        transform=from_origin(500000, 2800000, 0.5, 0.5), nodata=None, **layout,
    ) as dst:  # fmt: skip
        dst.write(pixels)
    return pixels


@pytest.fixture
def scenes(bucket, tmp_path):
    """``{layout: (s3 uri, local path, pixels)}`` for a tiled and a striped copy of one scene."""
    out = {}
    for layout in ("tiled", "striped"):
        path = tmp_path / f"{layout}.tif"
        pixels = _scene(path, layout == "tiled")
        boto3.client("s3").upload_file(str(path), bucket[len("s3://") :], f"scenes/{layout}.tif")
        out[layout] = (f"{bucket}/scenes/{layout}.tif", path, pixels)
    return out


@pytest.fixture
def proxy(s3_endpoint, monkeypatch, request):
    """A proxy in front of the S3 server; ``request.param``: FaultyS3Proxy arguments (none: count only)."""
    kwargs = getattr(request, "param", {"max_faults": 0})
    with FaultyS3Proxy(s3_endpoint, **kwargs) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        try:
            yield p
        finally:
            storage._client_for_pid.cache_clear()  # this one holds the proxy's, gone after the test


def _gets(proxy: FaultyS3Proxy, uri: str) -> tuple[int, int]:
    """``(GET requests, body bytes)`` the proxy forwarded for ``uri``."""
    bucket, key = storage.split_s3(uri)
    where = ("GET", f"/{bucket}/{key}")
    return proxy.requests[where], proxy.body_bytes[where]


@pytest.mark.parametrize("layout", ["tiled", "striped"])
def test_a_window_read_from_s3_equals_the_local_read(scenes, proxy, layout):
    uri, path, pixels = scenes[layout]
    with SceneReader(SceneRef("s", uri)) as remote, SceneReader(SceneRef("s", str(path))) as local:
        assert (remote.width, remote.height, remote.bands, remote.crs) == (SIZE, SIZE, 3, local.crs)
        assert remote.window_transform(256, 384, 128) == local.window_transform(256, 384, 128)
        got, valid = remote.read(256, 384, 128)
        want, _ = local.read(256, 384, 128)
    assert np.array_equal(got, want) and np.array_equal(got, pixels[:, 256:384, 384:512]) and valid.all()
    requests, read = _gets(proxy, uri)
    size = os.path.getsize(path)
    if layout == "tiled":  # the header chunk and the one tile under the window, not the scene
        assert read < size / 8, (read, size)
    else:  # a striped file costs the strips crossing the window: more bytes, the same pixels
        assert read < size, (read, size)
    assert requests >= 1


def test_probing_a_scene_reads_its_header_only(scenes, proxy):
    uri, path, _ = scenes["tiled"]
    with SceneReader(SceneRef("s", uri)) as reader:
        assert (reader.bands, reader.dtype, reader.width, reader.height) == (3, "uint8", SIZE, SIZE)
        assert "UTM zone 40N" in reader.crs
    requests, read = _gets(proxy, uri)
    assert requests <= 3 and read <= 64 * 1024 < os.path.getsize(path) / 40  # a few 16 KiB chunks
    assert not any(method == "GET" and p.endswith("/") for method, p in proxy.requests)  # no listing


def test_a_region_reads_and_georeferences_only_that_part(scenes, proxy):
    uri, _, pixels = scenes["tiled"]
    with SceneReader(SceneRef("s", uri), region=[512, 640, 256, 1000]) as reader:  # clipped at the edge
        assert (reader.height, reader.width, reader.region) == (256, 384, [512, 640, 256, 384])
        got, _ = reader.read(0, 0, 256, 384)
        assert np.array_equal(got, pixels[:, 512:768, 640:1024])
        assert reader.transform.c == 500000 + 640 * 0.5 and reader.transform.f == 2800000 - 512 * 0.5
    with pytest.raises(DataError, match=r"region \[2000, 0, 10, 10\] lies outside .*1024x1024 px"):
        SceneReader(SceneRef("s", uri), region=[2000, 0, 10, 10]).__enter__()


@pytest.mark.parametrize(
    "proxy", [{"every": 1, "burst": 1, "max_faults": 6, "kinds": ("503", "reset", "cut")}], indirect=True
)
def test_s3_faults_during_window_reads_are_retried(scenes, proxy):
    uri, _, pixels = scenes["tiled"]
    with SceneReader(SceneRef("s", uri)) as reader:
        for row, col in ((0, 0), (384, 512), (896, 896)):
            got, _ = reader.read(row, col, 128)
            assert np.array_equal(got, pixels[:, row : row + 128, col : col + 128])
    assert sum(proxy.faults.values()) >= 3, proxy.faults


def test_a_store_that_keeps_failing_is_named_with_the_window(scenes, proxy, monkeypatch):
    """The scene opens (HEAD and header); then the store answers every request 503: one error
    naming the window, after GDAL's and rsdiff's retries (both set short here)."""
    monkeypatch.setenv("RSDIFF_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.05")
    uri, _, _ = scenes["tiled"]
    window = r"window \(row=256, col=0, 128 px\)"
    with (
        SceneReader(SceneRef("s", uri)) as reader,
        pytest.raises(StorageError, match=rf"cannot read {window} of {uri} from S3 .* after 2 tries"),
    ):
        proxy.down = True
        reader.read(256, 0, 128)


@pytest.mark.parametrize(
    "proxy", [{"every": 2, "burst": 10_000, "max_faults": 10_000, "kinds": ("503",)}], indirect=True
)
def test_a_store_failing_while_the_header_is_read_is_no_bad_raster(scenes, proxy, monkeypatch):
    """The object's HEAD and GDAL's first range pass, then the store answers 503 to everything: GDAL
    calls the header it got half of "not recognized as a supported format", but it met HTTP
    failures on the way, so the read is retried and then named as the store's failure (or, where
    GDAL's first range held the whole header, the window's), never as a file that is no raster."""
    monkeypatch.setenv("RSDIFF_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.05")
    uri, _, _ = scenes["tiled"]
    with (
        pytest.raises(StorageError, match=rf"cannot read .* of {uri} from S3 .* after 2 tries"),
        SceneReader(SceneRef("s", uri)) as reader,
    ):
        reader.read(256, 0, 128)


def test_missing_objects_and_files_that_are_no_raster_are_told_apart(bucket, s3_endpoint):
    with pytest.raises(storage.NotFoundError, match="no such object"):
        SceneReader(SceneRef("s", f"{bucket}/nope.tif")).__enter__()
    storage.write_bytes(f"{bucket}/text.tif", b"hello, not a raster" * 100)
    with pytest.raises(DataError, match=f"{bucket}/text.tif is not a readable raster"):
        SceneReader(SceneRef("s", f"{bucket}/text.tif")).__enter__()


def test_a_token_that_expires_mid_scene_is_renewed_and_the_read_goes_on(scenes, proxy, monkeypatch):
    """The store starts refusing the keys a scene was opened with (``ExpiredToken``, as S3 answers
    a temporary credential past its lifetime) while the credential chain now gives new ones: the
    reader takes the new keys, reopens the scene and reads on; nothing fails."""
    uri, _, pixels = scenes["tiled"]
    with SceneReader(SceneRef("s", uri)) as reader:
        got, _ = reader.read(0, 0, 128)
        assert np.array_equal(got, pixels[:, :128, :128])
        proxy.expired_keys.add(os.environ["AWS_ACCESS_KEY_ID"])  # the first token expires ...
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIARSDIFFRENEWED0002")  # ... and the chain renews it
        monkeypatch.setenv("AWS_SESSION_TOKEN", "renewed-token")
        for row, col in ((512, 512), (896, 0)):
            got, valid = reader.read(row, col, 128)
            assert np.array_equal(got, pixels[:, row : row + 128, col : col + 128]) and valid.all()
    assert proxy.refused_by_client["gdal"] >= 1  # the old keys were really refused
