"""CI: dmgrd.infer in a virtual environment that has no torch (only numpy, pillow and onnxruntime) predicts what
the checkpoint predicts. .ci/run runs it twice:

  .venv/bin/python .ci/infer_without_torch.py reference DIR    # with torch: `dmgrd train` a tiny model, export
                                                                # it, and the checkpoint's predictions of a few
                                                                # images (DIR/expected.json)
  PYTHONPATH=. .venv-infer/bin/python .ci/infer_without_torch.py check DIR   # without: the ONNX file's match
"""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TOLERANCE = 1e-4
SIZE = 64
STRIDE = (40, 24)


def predictions(inferencer, images: list[Path], large: Path) -> dict:
    results = inferencer.predict_batch(images)
    tiled = inferencer.predict_tiled(large, stride=STRIDE)
    return {"plain": [[r.score, r.normalized_score, r.label, r.anomaly_map.tolist()] for r in results],
            "tiled": [tiled.score, tiled.label, tiled.anomaly_map.tolist()]}


def image_files(folder: Path) -> tuple[list[Path], Path]:
    return sorted(folder.glob("image*.png")), folder / "large.png"


def reference(folder: Path) -> None:
    import dmgrd
    from dmgrd.cli import main

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(90, 70, 3), (64, 64), (120, 200, 3)]):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"image{i}.png")
    Image.fromarray(rng.integers(0, 256, (200, 150, 3), dtype=np.uint8)).save(folder / "large.png")
    main(["train", "--dataset", "synthetic", "--method", "rd4ad", "--backbone", "efficientnet_lite0", "--weights",
          "none", "--image-size", str(SIZE), "--steps", "2", "--batch-size", "4", "--device", "cpu", "--out",
          str(folder)])
    main(["export", "--checkpoint", str(folder / "model.pt"), "--out", str(folder / "model.onnx")])
    expected = predictions(dmgrd.Inferencer(folder / "model.pt"), *image_files(folder))
    (folder / "expected.json").write_text(json.dumps(expected))
    print(f"reference predictions of {folder / 'model.pt'} written")


def same(got: list, want: list) -> bool:
    """Scores, normalised scores and maps within TOLERANCE, labels equal."""
    return all(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)).max() < TOLERANCE
               if isinstance(w, float | list) else g == w for g, w in zip(got, want, strict=True))


def check(folder: Path) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("this environment has torch installed: the check would prove nothing")
    from dmgrd.infer import Inferencer

    got = predictions(Inferencer(folder / "model.onnx"), *image_files(folder))
    want = json.loads((folder / "expected.json").read_text())
    mismatched = [i for i, (g, w) in enumerate(zip(got["plain"], want["plain"], strict=True)) if not same(g, w)]
    if mismatched or not same(got["tiled"], want["tiled"]):
        raise SystemExit(f"the ONNX predictions without torch differ from the checkpoint's: images {mismatched}, "
                         f"tiled {got['tiled'][:2]} vs {want['tiled'][:2]}")
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "torchvision", "triton"))
    assert not loaded, loaded
    print(f"dmgrd.infer without torch: {len(got['plain'])} images and a tiled one match the checkpoint's")


if __name__ == "__main__":
    {"reference": reference, "check": check}[sys.argv[1]](Path(sys.argv[2]))
