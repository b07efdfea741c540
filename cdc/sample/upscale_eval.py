"""Fidelity and detail of `cdc upscale` against bicubic and Lanczos on held-out Fashion-MNIST.

    python -m cdc.sample.upscale_eval --ckpt RUN [--n 300] [--variants 4] [--out DIR]

The first --n test images (32 px, zero-padded as `cdc prepare` does) are box-averaged to 8 and to
16 px and rounded to uint8, as the stored pyramid levels the model trained on; each low-res image is
brought back to 32 px by PIL bicubic, PIL Lanczos and `cdc upscale` (the library call the command
makes: null class, CFG off, the run's other sampler defaults; variant j from seed + j), and with the
true class at the run's CFG. Per method: PSNR and SSIM against the originals (fidelity: mean over
images, and over variants), consistency (PSNR of the output's box average against the input: does it
honour the input?), and the per-level SWD of cdc.eval.swd against the originals (the 32-px band-pass
level is the detail; the noise floor is the SWD of the next --n test images against the first).
Writes results.json and one grid per factor to --out (docs/upscale.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cdc.eval.fmnist import load_split
from cdc.eval.swd import swd_descriptors, swd_levels
from cdc.flow.pyramid import down_to
from cdc.sample import edit as E
from cdc.sample.edit_run import EditContext
from cdc.sample.figures import rgb, tile, to_uint8, upsample

SIDE = 32


def to_u8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (N, C, H, W) -> uint8 (N, C, H, W), the PNGs' rounding."""
    return torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).contiguous()


def classical(u8: torch.Tensor, side: int, method: int) -> torch.Tensor:
    """PIL resize of uint8 (N, 1, r, r) to `side` with `method` (Image.BICUBIC, Image.LANCZOS)."""
    out = [np.asarray(Image.fromarray(a[0].numpy()).resize((side, side), method)) for a in u8]
    return torch.from_numpy(np.stack(out))[:, None]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR (dB, peak 255) of uint8 image batches."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(255.0**2 / mse)).mean())


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03) of uint8 batches."""
    g = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None].double()  # (1, 1, 11, 11)
    x, y = a.double(), b.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w)  # valid window positions only

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.flatten(1).mean(1).mean())


def swd(u8: torch.Tensor, ref_desc: list[np.ndarray]) -> list[float]:
    """Per-level SWD (finest first) of uint8 (N, 1, 32, 32) against the reference descriptors."""
    desc = swd_descriptors(_rgb(u8), 0, 64, seed=1)
    return [round(v, 2) for v in swd_levels(ref_desc, desc, seed=0, device="cpu")["levels"]]


def _rgb(u8: torch.Tensor) -> np.ndarray:
    return u8.repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)


def row(name: str, out: torch.Tensor, orig: torch.Tensor, low: torch.Tensor, ref_desc) -> dict:
    """One table row: out uint8 (V, N, 1, 32, 32), V variants of every image."""
    r = low.shape[-1]
    lo_in = low.double()
    cons = [psnr(down_to(o.double(), r).round().to(torch.uint8), lo_in.to(torch.uint8)) for o in out]
    return {
        "method": name,
        "variants": len(out),
        "psnr": round(float(np.mean([psnr(o, orig) for o in out])), 2),
        "ssim": round(float(np.mean([ssim(o, orig) for o in out])), 4),
        "consistency_psnr": round(float(np.mean(cons)), 2),
        "swd": swd(out.flatten(0, 1), ref_desc),
    }


def run_factor(ctx: EditContext, ctx_c: EditContext, x: torch.Tensor, y: torch.Tensor, r: int, variants: int,
               ref_desc) -> tuple[list[dict], dict]:  # fmt: skip
    """Rows for inputs at side r; returns the rows and the images for the grid."""
    orig = to_u8(x)
    low = to_u8(down_to(x, r))  # (N, 1, r, r): the stored pyramid level (rounded box average)
    lowf = low.float() / 127.5 - 1.0
    rows = [
        row("bicubic", classical(low, SIDE, Image.BICUBIC)[None], orig, low, ref_desc),
        row("lanczos", classical(low, SIDE, Image.LANCZOS)[None], orig, low, ref_desc),
    ]
    t0 = time.perf_counter()
    cd = to_u8(E.run_edits(ctx.sampling, [E.upscale_edit(v, ctx.sched) for v in lowf], n=variants))
    sec = (time.perf_counter() - t0) / len(cd)
    cd = cd.view(len(x), variants, 1, SIDE, SIDE).transpose(0, 1)  # (V, N, 1, 32, 32)
    rows.append(row("cdc upscale, 1 variant", cd[:1], orig, low, ref_desc) | {"sec_per_image": round(sec, 3)})
    rows.append(row(f"cdc upscale, {variants} variants (each)", cd, orig, low, ref_desc))
    mean = (cd.double().mean(0).round().to(torch.uint8))[None]
    rows.append(row(f"cdc upscale, mean of {variants} variants", mean, orig, low, ref_desc))
    cc = torch.empty_like(orig)
    for c in y.unique().tolist():  # the true class at the run's CFG: one run per class
        idx = (y == c).nonzero().flatten()
        ctx_c.sampling.label = c
        cc[idx] = to_u8(E.run_edits(ctx_c.sampling, [E.upscale_edit(lowf[i], ctx.sched) for i in idx], n=1))
    cc = cc[None]
    rows.append(row("cdc upscale --class (true), run's CFG", cc, orig, low, ref_desc))
    pics = {"low": low, "bicubic": classical(low, SIDE, Image.BICUBIC), "lanczos": classical(low, SIDE, Image.LANCZOS),
            "cdc": cd, "class": cc[0], "orig": orig}  # fmt: skip
    return rows, pics


def grid(p: dict, count: int = 8) -> np.ndarray:
    """Rows: input (nearest) | bicubic | Lanczos | cdc variants | true class | original, 2x enlarged."""

    def big(t: torch.Tensor) -> np.ndarray:  # (1, r, r) uint8 -> (64, 64, 3)
        return rgb(upsample(t[0].numpy()[..., None], 64))

    rows = []
    for i in range(count):
        row_ = [big(p["low"][i]), big(p["bicubic"][i]), big(p["lanczos"][i])]
        row_ += [big(v[i]) for v in p["cdc"]] + [big(p["class"][i]), big(p["orig"][i])]
        rows.append(row_)
    return tile(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--variants", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("upscale-eval"))
    ap.add_argument("--guide", default=None, help="as cdc upscale --guide (default: the run's)")
    a = ap.parse_args(argv)
    x, y = load_split("test")
    x, y, other = x[: a.n], y[: a.n], x[a.n : 2 * a.n]
    ref_desc = swd_descriptors(_rgb(to_u8(x)), 0, 64, seed=1)
    floor = swd(to_u8(other), ref_desc)
    kw = dict(out=a.out / "unused", device="cpu", progress=False, guide=a.guide)
    ctx = EditContext.open(a.ckpt, None, "upscale", **kw)
    ctx_c = EditContext.open(a.ckpt, 0, "upscale", **kw)
    a.out.mkdir(parents=True, exist_ok=True)
    res = {"ckpt": ctx.settings["ckpt"], "step": ctx.settings["step"], "n": a.n, "variants": a.variants,
           "settings": {k: ctx.settings.get(k) for k in ("steps", "cfg", "solver", "guide", "guide_scale", "seed")},
           "settings_class": {k: ctx_c.settings.get(k) for k in ("cfg", "guide", "guide_scale")},
           "swd_noise_floor": floor, "factors": {}}  # fmt: skip
    for r in (8, 16):
        rows, pics = run_factor(ctx, ctx_c, x, y, r, a.variants, ref_desc)
        res["factors"][f"{r}->32"] = rows
        Image.fromarray(grid(pics)).save(a.out / f"fmnist-{r}to32.png", optimize=True)
        for rw in rows:
            print(f"{r}->32  {rw}", flush=True)
    (a.out / "results.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
