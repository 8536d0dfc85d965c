"""Peak memory (RSS) and time of tiled inference on a large image through the ONNX path (no torch).

  python benchmarks/tiled_memory.py prepare DIR --image-size 8000x8000 --input-size 256   # torch: model + image
  python benchmarks/tiled_memory.py measure DIR [--stride 128x128] [--batch-size 8]        # no torch: the run

``prepare`` exports an (untrained: memory and time do not depend on the weights) RD4AD with the
efficientnet_lite0 teacher at the input size to DIR/model.onnx and writes an 8-bit RGB test image DIR/large.png.
``measure`` runs in a process that never imports torch and prints the RSS after loading the model, the peak RSS
of the whole process, the map size and the time.
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def prepare(args) -> None:
    import dmgrd
    from dmgrd.export import export_onnx

    args.dir.mkdir(parents=True, exist_ok=True)
    model = dmgrd.RD4AD("efficientnet_lite0", weights=None, image_size=args.input_size)
    model.set_thresholds(1.0, 1.0, score_range=(0.5, 1.0))
    export_onnx(model, args.dir / "model.onnx")
    height, width = args.image_size
    rows = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    cols = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    image = np.stack([np.broadcast_to(rows, (height, width)), np.broadcast_to(cols, (height, width)),
                      (rows + cols) / 2], axis=2).astype(np.uint8)
    Image.MAX_IMAGE_PIXELS = None
    Image.fromarray(image).save(args.dir / "large.png")
    print(f"wrote {args.dir / 'model.onnx'} and {args.dir / 'large.png'} ({height}x{width})")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(args) -> None:
    from dmgrd.infer import Inferencer

    Image.MAX_IMAGE_PIXELS = None
    inferencer = Inferencer(args.dir / "model.onnx")
    loaded = peak_mb()
    start = time.perf_counter()
    result = inferencer.predict_tiled(args.dir / "large.png", stride=args.stride, batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    torch_loaded = any(name.split(".")[0] == "torch" for name in sys.modules)
    print(f"map {result.anomaly_map.shape} ({result.anomaly_map.nbytes / 2**20:.0f} MB), score {result.score:.4f}, "
          f"{seconds:.1f} s; RSS after loading the model {loaded:.0f} MB, peak {peak_mb():.0f} MB; "
          f"torch imported: {torch_loaded}")


def main() -> None:
    from dmgrd.sizes import parse_size, size_pair

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prepare", "measure"])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--image-size", type=lambda t: size_pair(parse_size(t)), default=(8000, 8000))
    parser.add_argument("--input-size", type=lambda t: size_pair(parse_size(t)), default=(256, 256))
    parser.add_argument("--stride", type=lambda t: size_pair(parse_size(t)), help="default: half the tile")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    (prepare if args.step == "prepare" else measure)(args)


if __name__ == "__main__":
    main()
