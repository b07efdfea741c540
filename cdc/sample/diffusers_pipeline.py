"""A diffusers pipeline over the Python API: `CDCPipeline.from_pretrained(DIR)(class_labels=[3, 7])`.

A thin adapter: loading is `cdc.load(DIR)` (safetensors + JSON, never code from the folder) and
sampling is `Generator.sample`, so the images equal `cdc.load(DIR).sample(...)` at the same seed.
The diffusers call maps onto the API as
  class_labels        -> classes (image i has class_labels[i]; n = len(class_labels))
  num_inference_steps -> steps per stage (an int for every stage, or a list, one per stage)
  guidance_scale      -> cfg
  generator           -> seed = generator.initial_seed(); image i's noise comes from (seed, i)
                         (cdc's per-image seeds), not from the generator's stream
  None                -> the checkpoint's stored setting, as `cdc sample` uses it.
  callback_on_step_end -> called once per stage (cdc's "step" is a stage of the pyramid) as
                         callback(pipe, stage, t, {"latents": x}): t the global time the stage
                         ends at (its window's upper bound), x that stage's images,
                         float (N, C, side, side) in [-1, 1] (pixel space: the latents are the
                         images); a "latents" tensor in the dict it returns replaces that stage's
                         output for the finer stages (diffusers' callback_on_step_end convention).
`DiffusionPipeline.from_pretrained(DIR, custom_pipeline=<this file>)` also works once the folder
holds a model_index.json (write_model_index); see docs/design-notes.md. Only this module imports
diffusers (`pip install 'cdc[diffusers]'`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

try:
    import diffusers
    from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin
except ImportError:
    raise ImportError("the diffusers pipeline needs diffusers: pip install 'cdc[diffusers]'") from None

from cdc.fileio import display, write_json
from cdc.flow.matching import Schedule
from cdc.sample.api import Generator, load
from cdc.sample.preview import StageImages

_DTYPES = {None: None, torch.float32: "fp32", torch.bfloat16: "bf16"}  # torch_dtype -> cdc.load's dtype
MODEL_INDEX = "model_index.json"
_LIBRARY = "cdc.sample.diffusers_pipeline"  # the module diffusers resolves the model component from
CALLBACK_TENSORS = ["latents"]  # what callback_on_step_end_tensor_inputs may name


class CDCModel(ModelMixin):
    """The pipeline's one component: a `cdc.load` Generator, its network registered as a submodule
    so that `pipe.to(device)` and `pipe.device` see it."""

    def __init__(self, generator: Generator) -> None:
        super().__init__()
        self.net = generator.model
        self.cdc = generator

    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype | None = None, **_: Any) -> CDCModel:
        """An exported folder (or a run / checkpoint) through cdc.load on the CPU; diffusers' own
        loading options (device_map, variant, ...) do not apply to a cdc folder and are ignored."""
        if torch_dtype not in _DTYPES:
            raise ValueError(f"torch_dtype: expected torch.float32 or torch.bfloat16 (or None), got {torch_dtype}")
        return cls(load(path, device="cpu", dtype=_DTYPES[torch_dtype]))


class CDCPipeline(DiffusionPipeline):
    """Class-conditional sampling of a CDC-FM export; returns ImagePipelineOutput."""

    model_cpu_offload_seq = "model"
    _callback_tensor_inputs = CALLBACK_TENSORS

    def __init__(self, model: CDCModel) -> None:
        super().__init__()
        self.register_modules(model=model)

    @classmethod
    def from_pretrained(cls, path: str | Path, torch_dtype: torch.dtype | None = None, **kwargs: Any) -> CDCPipeline:
        """The pipeline of an exported folder (no model_index.json needed). torch_dtype None samples
        as `cdc sample` (bf16 autocast on CUDA), torch.float32 or torch.bfloat16 force one."""
        return cls(CDCModel.from_pretrained(path, torch_dtype=torch_dtype, **kwargs))

    @torch.inference_mode()
    def __call__(
        self,
        class_labels: int | list[int],
        num_inference_steps: int | list[int] | None = None,
        guidance_scale: float | list[float] | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """len(class_labels) images; "pil" gives PIL images, "np" float (N, H, W, C) and "pt" float
        (N, C, H, W), both in [0, 1]. The seed is generator.initial_seed() (None: the stored seed).
        callback_on_step_end(pipe, stage, t, kwargs): after each stage (the module doc)."""
        labels = [class_labels] if isinstance(class_labels, int) else list(class_labels)
        if not labels:
            raise ValueError("class_labels: give at least one class id")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type: expected pil, np or pt, got {output_type!r}")
        if isinstance(generator, (list, tuple)):
            raise ValueError("generator: pass one torch.Generator; cdc seeds each image from (its seed, index)")
        g = self.model.cdc
        g.device = self.model.device  # follow pipe.to(device)
        seed = None if generator is None else generator.initial_seed()
        on_stage = _stage_callback(self, callback_on_step_end, callback_on_step_end_tensor_inputs)
        steps, cfg = num_inference_steps, guidance_scale
        images = g.sample(classes=labels, n=len(labels), steps=steps, cfg=cfg, seed=seed, on_stage=on_stage)
        if output_type == "pil":
            out: Any = g.to_pil(images)
        else:
            out = images.float() / 255.0
            out = out.permute(0, 2, 3, 1).numpy() if output_type == "np" else out
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=out) if return_dict else (out,)


def _stage_callback(pipe: CDCPipeline, callback, names: list[str] | None):
    """Generator.sample's on_stage calling a diffusers-style callback_on_step_end, or None."""
    names = list(CALLBACK_TENSORS if names is None else names)
    if bad := [n for n in names if n not in CALLBACK_TENSORS]:
        raise ValueError(
            f"callback_on_step_end_tensor_inputs: {bad} not in {CALLBACK_TENSORS} (the stage's images)"
        )
    if callback is None:
        return None

    bounds = Schedule.from_config(pipe.model.cdc.config.flow).bounds

    def on_stage(s: StageImages) -> torch.Tensor | None:
        out = callback(pipe, s.stage, bounds[s.stage + 1], {n: s.x for n in names})
        return out.get("latents") if isinstance(out, dict) else None

    return on_stage


def write_model_index(folder: str | Path) -> Path:
    """Add model_index.json to an exported folder so `DiffusionPipeline.from_pretrained(folder,
    custom_pipeline=<this file>)` finds its component; written atomically, it names no code file
    (diffusers resolves the component from this module, already imported by the custom pipeline)."""
    from cdc.train.exported import is_export

    folder = Path(folder)
    if not is_export(folder):
        raise ValueError(f"{display(folder)} is not a `cdc export` folder (no config.json); export the run first")
    index = {"_class_name": "CDCPipeline", "_diffusers_version": diffusers.__version__, "model": [_LIBRARY, "CDCModel"]}
    path = folder / MODEL_INDEX
    write_json(path, index, what="model_index.json")
    return path


if __name__ != _LIBRARY:
    # Loaded by diffusers as a custom_pipeline file (a copy under another module name): hand out the
    # package's own classes, so model_index.json's component resolves (diffusers looks it up in
    # sys.modules) and there is one CDCPipeline class, not two.
    from cdc.sample.diffusers_pipeline import CDCModel, CDCPipeline  # noqa: F811
