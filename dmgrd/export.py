"""Export of a trained model to ONNX: the model's own forward, traced with every op on its torch reference."""

import copy
import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn

from dmgrd import ops


class MapAndScore(nn.Module):
    """``model(images)`` as the pair ONNX returns: (anomaly maps [B, 1, H, W], scores [B])."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prediction = self.model(images)
        return prediction.anomaly_map, prediction.score


def _cpu_float_copy(model: nn.Module) -> nn.Module:
    """``model`` itself when it is on the CPU in float32, else a CPU float32 copy (the caller's stays as it is)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors):
        return model
    return copy.deepcopy(model).cpu().float()


def export_onnx(model, path: str | Path, opset: int = 17, batch_size: int = 2) -> float | None:
    """Write ``model`` (in eval mode, on the CPU in float32) as ONNX to ``path``.

    The graph is the model's ``forward`` traced under :func:`dmgrd.ops.use_backend` ``("torch")``, so it is the
    same computation as ``model(images)``: inputs ``images`` [B, 3, H, W] in [0, 1] (any B), outputs
    ``anomaly_map`` and ``score``. Returns the largest difference of map and score between onnxruntime and
    torch on random images (None when onnxruntime is not installed). The caller's model keeps its device,
    dtype and train/eval mode.
    """
    source = _cpu_float_copy(model)
    was_training = source.training
    graph = MapAndScore(source.eval()).eval()
    images = torch.rand(batch_size, 3, *model.config.size, generator=torch.Generator().manual_seed(0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad(), ops.use_backend("torch"), warnings.catch_warnings():
            # The input checks compare shapes, which the trace keeps as constants: right for every batch size
            # (the one dynamic axis). The TorchScript exporter is the one that needs no extra package.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"dmgrd\.export")
            torch.onnx.export(graph, (images,), str(path), input_names=["images"],
                              output_names=["anomaly_map", "score"],
                              dynamic_axes={"images": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}},
                              opset_version=opset, dynamo=False)
            expected = graph(images)
    finally:
        source.train(was_training)
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["anomaly_map", "score"], {"images": images.numpy()})
    return max(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected, strict=True))
