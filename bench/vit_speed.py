"""Ours vs timm's VisionTransformer: same config, same weights, timed interleaved in one run:
`python -m bench.vit_speed` (needs timm).

    python -m bench.vit_speed                 # MNIST configs and ViT-Ti/16 at 224 (and 512: 1024 patches)
    python -m bench.vit_speed --rounds 5 --configs mnist

Prints img/s per task and the ratios: train and all-maps are ours / timm (higher is better for us);
"cls"/plain is the time of `return_attn="cls"` over a plain forward of our model (1.0 = free);
explicit/SDPA compares our train step with `fused_attn=False` (explicit softmax) and True (the SDPA kernel);
wrapper/AttentionExtract is a timm model through models.timm_vit.TimmViT, `model(x, return_attn=True)` (logits and
every layer's map), against timm's own `timm.utils.AttentionExtract` (fx, its default) on the same weights.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from models.timm_vit import TimmViT as TimmWrapper
from models.vit import VisionTransformer
from utils.config import build_parser

CONFIGS = {  # name: (image size, VisionTransformer kwargs, train batch, inference batch)
    "mnist_p7": (28, dict(embed_dim=64, hidden_dim=128, num_heads=4, num_layers=4, patch_size=7, num_channels=1,
                          num_patches=16, num_classes=10), 128, 1024),  # the mnist.train default
    "mnist": (28, dict(embed_dim=64, hidden_dim=256, num_heads=4, num_layers=6, patch_size=4, num_channels=1,
                       num_patches=49, num_classes=10), 256, 1024),
    "vit_ti_224": (224, dict(embed_dim=192, hidden_dim=768, num_heads=3, num_layers=12, patch_size=16,
                             num_channels=3, num_patches=196, num_classes=1000), 32, 64),
    "vit_ti_512": (512, dict(embed_dim=192, hidden_dim=768, num_heads=3, num_layers=12, patch_size=16,
                             num_channels=3, num_patches=196, num_classes=1000), 4, 8),
}


def timm_model(ours: VisionTransformer, explicit: bool):
    """timm's model with our weights; explicit=True: unfused attention with hooks collecting every map."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    c = ours.config
    model = TimmViT(img_size=c["grid_size"][0] * c["patch_size"], patch_size=c["patch_size"],
                    in_chans=c["num_channels"], num_classes=c["num_classes"], embed_dim=c["embed_dim"],
                    depth=c["num_layers"], num_heads=c["num_heads"], mlp_ratio=c["hidden_dim"] / c["embed_dim"],
                    dynamic_img_size=True)
    model.load_state_dict(ours.state_dict())
    model.maps = []
    if explicit:
        for block in model.blocks:
            block.attn.fused_attn = False
            block.attn.attn_drop.register_forward_hook(lambda m, inp, out: model.maps.append(inp[0]))
    return model


def train_step(model, x, y, opt) -> Callable[[], None]:
    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def inference(fn) -> Callable[[], None]:
    def run():
        with torch.inference_mode():
            fn()
    return run


def measure(tasks: dict[str, Callable[[], None]], batch: int, rounds: int, iters: int) -> dict[str, float]:
    """img/s per task: median over rounds; the tasks (a pair to compare) alternate inside each round, in the
    reverse order every other round (A B, B A, ...), so neither always runs right after the other."""
    for fn in tasks.values():  # warm-up
        fn()
    times = {name: [] for name in tasks}
    for r in tqdm(range(rounds), desc="rounds", leave=False):
        for name, fn in list(tasks.items())[::-1 if r % 2 else 1]:
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            times[name].append((time.perf_counter() - start) / iters)
    return {name: batch / statistics.median(t) for name, t in times.items()}


def bench(name: str, rounds: int, iters: int) -> list[tuple[str, float, float, str]]:
    size, kwargs, train_batch, infer_batch = CONFIGS[name]
    torch.manual_seed(0)
    ours = VisionTransformer(**kwargs)
    fused, explicit = timm_model(ours, explicit=False), timm_model(ours, explicit=True)
    x = torch.randn(train_batch, kwargs["num_channels"], size, size)
    y = torch.randint(0, kwargs["num_classes"], (train_batch,))

    def train_rates(models: dict[str, torch.nn.Module]) -> dict[str, float]:
        steps = {k: train_step(m.train(), x, y, torch.optim.AdamW(m.parameters(), lr=1e-4)) for k, m in models.items()}
        return measure(steps, train_batch, rounds, iters)

    train = train_rates({"ours": ours, "timm": fused})
    twin = VisionTransformer(**kwargs)  # the same model with the explicit softmax
    twin.load_state_dict(ours.state_dict())
    for block in twin.blocks:
        block.attn.fused_attn = False
    softmax = train_rates({"explicit": twin, "sdpa": ours})
    ours.eval(), fused.eval(), explicit.eval()
    x = torch.randn(infer_batch, kwargs["num_channels"], size, size)

    def timm_maps():  # like ours, hand the maps to the caller, who drops them (not held until the next call)
        logits = explicit(x)
        maps, explicit.maps = explicit.maps, []
        return logits, maps

    plain = measure({"ours": inference(lambda: ours(x)), "timm": inference(lambda: fused(x))},
                    infer_batch, rounds, iters)
    maps = measure({"ours": inference(lambda: ours(x, return_attn=True)), "timm": inference(timm_maps)},
                   infer_batch, rounds, iters)
    cls = measure({"cls": inference(lambda: ours(x, return_attn="cls")), "plain": inference(lambda: ours(x))},
                  infer_batch, rounds, iters)
    wrapper = measure(wrapper_vs_extract(ours, x), infer_batch, rounds, iters)
    return [("train step (fwd+bwd+AdamW)", train["ours"], train["timm"], "ours/timm"),
            ("inference", plain["ours"], plain["timm"], "ours/timm"),
            ("inference + all maps", maps["ours"], maps["timm"], "ours/timm"),
            ('"cls" rows vs plain (ours)', cls["cls"], cls["plain"], "time cls/plain"),
            ("train step, explicit softmax vs SDPA (ours)", softmax["explicit"], softmax["sdpa"], "explicit/SDPA"),
            ("timm model through the wrapper, inference + all maps", wrapper["ours"], wrapper["timm"],
             "wrapper/AttentionExtract")]


def wrapper_vs_extract(ours: VisionTransformer, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    """Two tasks on timm models with our weights: the wrapped one's logits + every map (TimmViT switches timm's
    explicit attention on for the call), and timm's AttentionExtract (its maps only; it traces the explicit path,
    so that model's fused_attn is off, as timm's docs ask)."""
    from timm.utils import AttentionExtract

    wrapped = TimmWrapper(timm_model(ours, explicit=False).eval())
    traced = timm_model(ours, explicit=False).eval()
    for m in traced.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    extract = AttentionExtract(traced)
    return {"ours": inference(lambda: wrapped(x, return_attn=True)), "timm": inference(lambda: extract(x))}


PROG = "python -m bench.vit_speed"
CONFIG = {  # name -> (default, help); every entry is a flag
    "rounds": (7, "interleaved rounds; the median is reported"),
    "iters": (3, "calls per task per round"),
    "threads": (0, "torch CPU threads (0: torch's default, one per core)"),
}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(PROG, __doc__, {"options": CONFIG})
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="CONFIG",
                        help=f"models to compare: {', '.join(CONFIGS)} (default: all)")
    args = parser.parse_args(argv)
    for key in ("rounds", "iters"):
        if getattr(args, key) < 1:
            sys.exit(f"error: --{key} {getattr(args, key)} must be at least 1.")
    if args.threads < 0:
        sys.exit(f"error: --threads {args.threads} must be 0 (torch's default) or a positive count.")
    try:
        import timm  # noqa: F401  the reference
    except ImportError:
        sys.exit("error: bench.vit_speed compares with timm, which is not installed (pip install timm).")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| config | task | ours img/s | reference img/s | ratio |\n|---|---|---:|---:|---:|")
    for name in args.configs:
        for task, a, b, kind in bench(name, args.rounds, args.iters):
            ratio = b / a if kind.startswith("time") else a / b  # cls: time ratio = plain img/s / cls img/s
            print(f"| {name} | {task} | {a:.1f} | {b:.1f} | {ratio:.3f} ({kind}) |", flush=True)


if __name__ == "__main__":
    main()
