"""Run inside the TorchGeo environment: tiles/s TorchGeo delivers from a GeoTIFF, random and grid.

Usage: python torchgeo_side.py SCENE.tif SIZE BATCH SAMPLES; prints one JSON line. TorchGeo's
RasterDataset reads each sample's window from the GeoTIFF on the fly (through a cached
WarpedVRT and rasterio.merge), as with a RandomGeoSampler or GridGeoSampler in training.
"""

import json
import sys
import time
from pathlib import Path

import rasterio
import torch
import torchgeo
from torch.utils.data import DataLoader
from torchgeo.datasets import RasterDataset, stack_samples
from torchgeo.samplers import GridGeoSampler, RandomGeoSampler


def rate(loader: DataLoader, samples: int) -> float:
    """Tiles per second delivered by ``loader`` over about ``samples`` tiles (after one warm-up batch)."""
    batches = iter(loader)
    next(batches)
    seen, started = 0, time.perf_counter()
    for batch in batches:
        seen += batch["image"].shape[0]
        if seen >= samples:
            break
    return seen / (time.perf_counter() - started)


def main() -> None:
    """Random and grid sampling of one scene; one JSON line on stdout."""
    scene, size, batch, samples = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)

    class Scene(RasterDataset):
        filename_glob = scene.name
        is_image = True

    with rasterio.Env():  # GDAL's default block cache (5% of RAM), as a TorchGeo user has it
        dataset = Scene(paths=str(scene.parent))
        seeded = torch.Generator().manual_seed(0)
        random = RandomGeoSampler(dataset, size=size, length=samples + batch, generator=seeded)
        grid = GridGeoSampler(dataset, size=size, stride=size)
        out = {
            "random_tiles_s": rate(
                DataLoader(dataset, batch, sampler=random, collate_fn=stack_samples), samples
            ),
            "grid_tiles_s": rate(DataLoader(dataset, batch, sampler=grid, collate_fn=stack_samples), samples),
            "dtype": str(dataset[next(iter(grid))]["image"].dtype),
            "torchgeo": torchgeo.__version__,
            "torch": torch.__version__,
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
