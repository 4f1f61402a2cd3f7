"""Which read errors a retry can help, and how a damaged window is named."""

import pytest
from rasterio.errors import RasterioError, RasterioIOError
from rasterio.windows import Window

from tilepipe.geo.read_errors import describe_error, is_transient_read_error, unreadable_window


def chained(top: str, cause: str) -> RasterioError:
    """A rasterio error whose reason is in its cause, as rasterio raises them."""
    try:
        try:
            raise RasterioError(cause)
        except RasterioError as inner:
            raise RasterioIOError(top) from inner
    except RasterioIOError as outer:
        return outer


@pytest.mark.parametrize(
    "message",
    [
        "HTTP response code: 503",
        "HTTP response code: 429",
        "Please reduce your request rate.",  # S3's SlowDown, as GDAL reports it when opening
        "CPLE_HttpResponse: HTTP error code: 502",
        "curl error: Connection reset by peer",
        "Operation timed out after 30000 milliseconds",
        "Could not resolve host: bucket.example",
    ],
)
def test_faults_on_the_way_are_transient(message):
    assert is_transient_read_error(RasterioError(message))
    assert is_transient_read_error(chained("Read failed. See previous exception for details.", message))


@pytest.mark.parametrize(
    "message",
    [
        "img.tif, band 1: IReadBlock failed at X offset 1, Y offset 2: TIFFReadEncodedTile() failed.",
        "TIFFFillTile:Read error at row 0, col 0, tile 9; got 6996 bytes, expected 12299",
        "LZWDecode: Not enough data at scanline 12",
        "HTTP response code: 404",  # the object is not there: a retry finds it missing again
    ],
)
def test_damaged_or_missing_data_is_not(message):
    assert not is_transient_read_error(RasterioError(message))


def test_the_reason_is_taken_from_the_chain_and_the_window_named():
    exc = chained("Read failed. See previous exception for details.", "img.tif, band 1: IReadBlock failed")
    assert describe_error(exc) == "img.tif, band 1: IReadBlock failed"
    error = unreadable_window("img.tif", Window(64, 128, 32, 16), exc, "s7")
    assert str(error) == (
        "img.tif: scene s7: damaged data: rows 128-143, columns 64-95 cannot be read "
        "(img.tif, band 1: IReadBlock failed)"
    )
