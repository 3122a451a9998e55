"""A corpus of hostile inputs, one group per format the server accepts. Each must be answered with a 4xx in the
error schema of its API (native or OIP), within a bounded time, and the server must answer a good request
afterwards. Nothing here is allowed to reach a 500."""

from __future__ import annotations

import gzip
import io
import json
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import auth, png_bytes


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_header(width: int, height: int, payload: bytes = b"") -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` whatever its data holds."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(payload))
            + png_chunk(b"IEND", b""))


def npy_with_header(descr: str, shape: tuple, payload: bytes = b"") -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + payload


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def dicom(rows: int, cols: int, frames: int = 1, pixels: bool = True, payload: bytes | None = None) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if pixels:
        ds.PixelData = payload if payload is not None else b"\0" * 64
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def nifti(shape: tuple, payload: bytes = b"\0" * 64, gz: bool = False) -> bytes:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(shape)
    raw = header.binaryblock + b"\0\0\0\0" + payload  # vox_offset 352
    return gzip.compress(raw) if gz else raw


def tiff_with_header(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="TIFF")
    data = bytearray(buf.getvalue())
    # Rewrite ImageWidth (256) and ImageLength (257) entries of the first IFD.
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag, _kind = struct.unpack_from("<HH", data, entry)
        if tag in (256, 257):
            value = width if tag == 256 else height
            struct.pack_into("<HHI", data, entry, tag, 4, 1)
            struct.pack_into("<I", data, entry + 8, value)
    return bytes(data)


def jpeg_truncated() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()[:300]


def bmp_lying() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="BMP")
    data = bytearray(buf.getvalue())
    struct.pack_into("<ii", data, 18, 100_000, 100_000)  # BITMAPINFOHEADER width, height
    return bytes(data)


UPLOADS = {
    "png truncated": png_bytes()[:40],
    "png header lies (huge)": png_with_header(60_000, 60_000, b"\0" * 100),
    "png header lies (data short)": png_with_header(2_000, 2_000, b"\0" * 100),
    "png bomb": png_with_header(20_000, 20_000, b"\0" * (20_001 * 20_000))[:0] or b"",  # replaced below
    "jpeg truncated": jpeg_truncated(),
    "bmp header lies": bmp_lying(),
    "tiff header lies": tiff_with_header(50_000, 50_000),
    "npy object dtype": npy(np.array([{"a": 1}], dtype=object)),
    "npy huge shape header": npy_with_header("<f4", (100_000, 100_000), b"\0" * 64),
    "npy 4 GB shape header": npy_with_header("<f4", (30_000, 30_000), b"\0" * 64),
    "npy truncated": npy(np.zeros((32, 32), np.float32))[:-100],
    "npy nan": npy(np.full((32, 32), np.nan, np.float32)),
    "npy inf": npy(np.full((32, 32), np.inf, np.float32)),
    "npy complex": npy(np.zeros((4, 4), np.complex64)),
    "npy 5-d": npy(np.zeros((1, 1, 2, 8, 8), np.float32)),
    "nifti huge dims": nifti((30_000, 30_000, 30_000)),
    "nifti truncated": nifti((64, 64, 64)),
    "nifti.gz huge dims": nifti((30_000, 30_000, 3_000), gz=True),
    "dicom huge rows": dicom(65_535, 65_535),
    "dicom 10000 frames": dicom(512, 512, frames=10_000),
    "dicom no pixels": dicom(32, 32, pixels=False),
    "dicom truncated pixels": dicom(256, 256, payload=b"\0" * 100),
    "dicom corrupt": dicom(32, 32)[:200],
    "empty": b"",
    "text": b"GET / HTTP/1.1\r\n",
}


def _png_bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (30_000, 30_000)).save(buf, format="PNG")  # ~100 KB on the wire, 900 M pixels decoded
    return buf.getvalue()


UPLOADS["png bomb"] = _png_bomb()


def check_error(response: httpx.Response, oip: bool = False) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    body = response.json()
    if oip:
        assert isinstance(body["error"], str) and body["error"]
    else:
        assert set(body) == {"error"} and body["error"]["code"] and body["error"]["message"]
        assert "object at 0x" not in body["error"]["message"] and "/tmp/" not in body["error"]["message"]


@pytest.fixture(scope="module")
def key(served):
    return auth(served["keys"]["clinic"])


def still_serving(url: str, key: dict) -> None:
    ok = httpx.post(f"{url}/v1/models/cxr/predict", content=png_bytes(), headers=key, timeout=60)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("case", sorted(UPLOADS))
@pytest.mark.parametrize("encoding", ["raw", "multipart", "base64"])
def test_hostile_uploads(url, key, case, encoding):
    data = UPLOADS[case]
    name = {"dicom": "x.dcm", "nifti": "x.nii", "nifti.gz": "x.nii.gz", "npy": "x.npy"}.get(case.split()[0], "x.bin")
    if encoding == "raw":
        r = httpx.post(f"{url}/v1/models/cxr/predict", content=data, headers={**key, "x-filename": name}, timeout=60)
    elif encoding == "multipart":
        r = httpx.post(f"{url}/v1/models/cxr/predict", files={"file": (name, data)}, headers=key, timeout=60)
    else:
        import base64

        r = httpx.post(f"{url}/v1/models/cxr/predict", json={"image": base64.b64encode(data).decode(),
                                                             "filename": name}, headers=key, timeout=60)
    check_error(r)
    still_serving(url, key)


DEEP = b"[" * 100_000 + b"]" * 100_000
REQUESTS = {
    "json deep": (DEEP, {"content-type": "application/json"}),
    "json deep object": (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, {"content-type": "application/json"}),
    "json huge array": (json.dumps({"array": [0.5] * 3_000_000}).encode(), {"content-type": "application/json"}),
    "json nan array": (b'{"array": [[NaN, 1.0], [0.0, 1.0]]}', {"content-type": "application/json"}),
    "json invalid utf-8": (b'{"array": "\xff\xfe"}', {"content-type": "application/json"}),
    "json not an object": (b"[1, 2, 3]", {"content-type": "application/json"}),
    "json array of strings": (b'{"array": [["a", "b"]]}', {"content-type": "application/json"}),
    "json image not a string": (b'{"image": {"x": 1}}', {"content-type": "application/json"}),
    "json filename not a string": (b'{"image": "", "filename": [null, null]}', {"content-type": "application/json"}),
    "json array of booleans": (b'{"array": [[true, 0.5], [false, 1]]}', {"content-type": "application/json"}),
    "multipart without boundary": (b"--x\r\n\r\n", {"content-type": "multipart/form-data"}),
    "multipart broken": (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\nabc",
                         {"content-type": "multipart/form-data; boundary=b"}),
    "multipart without a file": (b"--b\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nabc\r\n--b--\r\n",
                                 {"content-type": "multipart/form-data; boundary=b"}),
    "form urlencoded": (b"file=abc", {"content-type": "application/x-www-form-urlencoded"}),
}


@pytest.mark.parametrize("case", sorted(REQUESTS))
def test_hostile_bodies_native(url, key, case):
    body, headers = REQUESTS[case]
    r = httpx.post(f"{url}/v1/models/cxr/predict", content=body, headers={**key, **headers}, timeout=60)
    check_error(r)
    still_serving(url, key)


def oip_body(**tensor) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32],
                                   "data": [0.5] * 1024, **tensor}]}).encode()


OIP = {
    "deep": (DEEP, {}),
    "not json": (b"\x89PNG", {}),
    "no inputs": (b'{"outputs": []}', {}),
    "inputs not a list": (b'{"inputs": 5}', {}),
    "huge shape": (oip_body(shape=[1_000_000_000, 1, 32, 32]), {}),
    "negative shape": (oip_body(shape=[-1, 1, 32, 32]), {}),
    "shape of strings": (oip_body(shape=["1", 1, 32, 32]), {}),
    "data too short": (oip_body(data=[0.5] * 10), {}),
    "data not numbers": (oip_body(data=["x"] * 1024), {}),
    "ragged data": (oip_body(data=[[0.5] * 32] * 31 + [[0.5] * 3]), {}),
    "nan data": (oip_body(data=[float("nan")] * 1024), {}),
    "out of range": (oip_body(data=[7.0] * 1024), {}),
    "bad datatype": (oip_body(datatype="FP128"), {}),
    "binary size lies": (oip_body(data=None, parameters={"binary_data_size": 10**12}), {}),
    "header length lies": (oip_body(), {"inference-header-content-length": "999999999"}),
    "header length negative": (oip_body(), {"inference-header-content-length": "-5"}),
    "parameters not an object": (oip_body(parameters=[1]), {}),
    "outputs unknown": (json.dumps({"inputs": json.loads(oip_body())["inputs"],
                                    "outputs": [{"name": "nope"}]}).encode(), {}),
    "two inputs": (json.dumps({"inputs": json.loads(oip_body())["inputs"] * 2}).encode(), {}),
}


@pytest.mark.parametrize("case", sorted(OIP))
def test_hostile_bodies_oip(url, key, case):
    body, headers = OIP[case]
    if case == "binary size lies":
        body = body.replace(b'"data": null, ', b"")
    r = httpx.post(f"{url}/v2/models/cxr/infer", content=body, headers={**key, **headers}, timeout=60)
    check_error(r, oip=True)
    still_serving(url, key)
