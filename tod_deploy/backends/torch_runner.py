"""PyTorch: the deploy model (rebuilt from the export's sidecar: same recipe, same weights)."""

from __future__ import annotations

import numpy as np
import torch

from tod_deploy.backends.base import ExportSource, RunnerOptions
from tod_deploy.methods.base import DeployModel
from tod_deploy.nn.postprocess import CONTRACT_OUTPUTS


class TorchRunner:
    backend = "torch"

    def __init__(self, model: DeployModel, output_names: list[str], threads: int | None = None) -> None:
        self.model = model.eval()
        self.output_names = output_names
        if threads:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        values = self.model.run(torch.from_numpy(images))
        return {name: values[name].numpy() for name in self.output_names}


def open_runner(source: ExportSource, options: RunnerOptions) -> TorchRunner:
    from tod_deploy.export.pipeline import rebuild_deploy_model

    return TorchRunner(rebuild_deploy_model(source.sidecar, options.log), list(CONTRACT_OUTPUTS), options.threads)
