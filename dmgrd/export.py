"""Export of a trained model to ONNX, through the pure-torch reference of every op."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from dmgrd import ops


class ScoringGraph(nn.Module):
    """images [B, 3, H, W] in [0, 1] -> (anomaly maps [B, 1, H, W], scores [B]), without input checks."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.model.config
        teacher = self.model.teacher.body((images - self.model.teacher.mean) / self.model.teacher.std)
        student = self.model.student_features(list(teacher))
        maps = ops.anomaly_map_reference(teacher, student, config.size, "sum", config.sigma)
        with ops.use_backend("torch"):
            return maps, self.model.image_scores(maps, list(teacher), student)


def export_onnx(model, path: str | Path, opset: int = 17, batch_size: int = 2) -> float | None:
    """Write ``model`` as ONNX to ``path``; return the max map difference against torch via onnxruntime
    (None when onnxruntime is not installed)."""
    graph = ScoringGraph(model.eval().cpu().float()).eval()
    images = torch.rand(batch_size, 3, *model.config.size, generator=torch.Generator().manual_seed(0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(graph, (images,), str(path), input_names=["images"], output_names=["anomaly_map", "score"],
                          dynamic_axes={"images": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}},
                          opset_version=opset, dynamo=False)
        expected = graph(images)[0]
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["anomaly_map"], {"images": images.numpy()})[0]
    return float((torch.from_numpy(got) - expected).abs().max())
