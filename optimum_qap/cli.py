"""The subcommands of `optimum-qap` (its argument parser is `optimum_qap_cli`, which imports this module once the
arguments are parsed)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

import optimum_qap_cli
from optimum_qap_cli import CliError
from optimum_qap_cli import first_line as _first_line

from .atomic import atomic_output
from .config import STATIC_GRANULARITIES, QAPrunerConfig

# ----------------------------------------------------------------------------- models, files


def resolve_model(name: str | None) -> str:
    """A local model folder or a Hub id; None is the shipped demo model."""
    if name is None:
        from .demo import DEMO_MODEL_PATH

        if not (DEMO_MODEL_PATH / "config.json").is_file():
            raise CliError(f"the demo model is not in {DEMO_MODEL_PATH} (python -m optimum_qap.demo.train); pass MODEL")
        return str(DEMO_MODEL_PATH)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CliError(f"{name} has no config.json: it is not a transformers model folder")
        return str(path)
    if path.exists():
        raise CliError(f"{name} is a file; expected a model folder or a Hub id")
    if path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise CliError(f"model folder {name} does not exist")
    return name  # a Hub id


def check_llava(name: str, allow_quantized: bool = False) -> None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot load the config of {name}: {_first_line(error)}") from error
    if config.model_type != "llava":
        raise CliError(f"{name} is a {config.model_type!r} model; optimum-qap needs a LLaVA model (model_type 'llava')")
    if not allow_quantized and getattr(config, "quantization_config", None) is not None:
        raise CliError(f"{name} is already quantized; pass the full-precision model")


def load_processor(name: str):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise CliError(f"cannot load the processor of {name}: {_first_line(error)}") from error


def load_model(name: str, args: argparse.Namespace, config: QAPrunerConfig | None):
    """``name`` as `LlavaForConditionalGeneration`, quantized and pruned per ``config`` (None: as saved)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    kwargs: dict[str, Any] = {"dtype": args.dtype}
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device:
        kwargs["device_map"] = device
    if config is not None:
        kwargs["quantization_config"] = config
    try:
        return LlavaForConditionalGeneration.from_pretrained(name, **kwargs).eval()
    except (OSError, ValueError) as error:
        raise CliError(f"cannot load {name}: {_first_line(error)}") from error


def check_output(path: Path, folder: bool = False, overwrite: bool = False) -> None:
    """Fail before any work when ``path`` cannot be written."""
    if not path.parent.is_dir():
        raise CliError(f"cannot write {path}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise CliError(f"cannot write {path}: folder {path.parent} is not writable")
    if path.is_dir() != folder and path.exists():
        raise CliError(f"cannot write {path}: it exists and is a {'file' if folder else 'folder'}")
    if folder and path.exists() and not overwrite:
        raise CliError(f"{path} exists; pass --overwrite to replace it")


def open_image(path: str) -> Image.Image:
    if not Path(path).is_file():  # a FIFO or device would block the read
        raise CliError(f"cannot read image {path}: {'not a regular file' if Path(path).exists() else 'no such file'}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise CliError(f"cannot read image {path}: {_first_line(error)}") from error


def image_and_prompt(path: str | None, prompt: str | None) -> tuple[Image.Image, str]:
    """The image at ``path`` with ``prompt``; without a path, a shipped demo image and its question (or ``prompt``)."""
    if path is not None:
        if prompt is None:
            raise CliError("--prompt is required with an IMAGE (the question asked about it)")
        return open_image(path), prompt
    from .demo import make_dataset

    example = make_dataset(1, "test")[0]
    return example.image, prompt or example.question


def safetensors_bytes(name: str | Path) -> int | None:
    """Bytes of the *.safetensors files of a local folder, or of a Hub model's cached snapshot (None if unknown)."""
    folder = Path(name)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(name), allow_patterns=["*.safetensors"], local_files_only=True))
        except Exception:  # not cached, or not a valid id: the size is informative only
            return None
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) or None


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "unknown"
    value = float(num_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            break
        value /= 1000
    return f"{value:.0f} B" if unit == "B" else f"{value:.2f} {unit}"


def make_config(args: argparse.Namespace, **fields: Any) -> QAPrunerConfig:
    """The QAPrunerConfig of the shared options; calibrates on built-in samples when needed or asked for."""
    calibrate = (
        args.calib_samples is not None
        or (args.a_bits < 16 and args.granularity in STATIC_GRANULARITIES)
        or fields.get("alpha") == "auto"
        or fields.get("fusion") == "outlier_slots"
    )
    return QAPrunerConfig(
        w_bits=args.w_bits,
        a_bits=args.a_bits,
        a_granularity=args.granularity,
        semantic=args.semantic,
        clip_text_model=args.clip_text_model,
        rotation=not args.no_rotation,
        weight_method=args.weight_method,
        calibration="builtin" if calibrate or args.weight_method == "gptq" else None,
        **({"num_calibration_samples": args.calib_samples} if args.calib_samples else {}),
        **fields,
    )


# ----------------------------------------------------------------------------- subcommands


PHASE_NAMES = {
    "rotate": "rotate (Hadamard)",
    "quantize": "quantize (round to nearest)",
    "gptq": "GPTQ",
    "calibrate": "calibrate activations",
    "choose": "choose {auto}",
}


def phase_lines(phases: dict[str, float], load_total: float, save: float, config: QAPrunerConfig) -> list[str]:
    """One line per phase of `compress`: loading is what `from_pretrained` spent outside the timed phases."""
    quantized_while_loading = config.quantizes_weights and not config.quantizes_after_loading
    rows = {"load (quantized while loading)" if quantized_while_loading else "load": load_total - sum(phases.values())}
    auto = "outlier slots" if config.fusion == "outlier_slots" else "alpha"
    rows |= {PHASE_NAMES[name].format(auto=auto): seconds for name, seconds in phases.items()}
    rows["save"] = save
    width = max(map(len, rows))
    return [f"    {name:<{width}}  {seconds:6.1f}" for name, seconds in rows.items()]


def compress(args: argparse.Namespace) -> int:
    from .hub import _describe_pruning, _describe_quantization, model_card
    from .progress import phase_seconds
    from .pruning.patch import visual_tokens_per_image
    from .pruning.selection import resolve_budget

    name = resolve_model(args.model)
    output = Path(args.output or f"{'demo' if args.model is None else Path(name).name}-qap")
    check_output(output, folder=True, overwrite=args.overwrite)
    check_llava(name)
    processor = load_processor(name)
    start = time.perf_counter()
    model = load_model(name, args, make_config(args, keep_ratio=args.keep_ratio, alpha=args.alpha, fusion=args.fusion))
    load_seconds = time.perf_counter() - start
    config: QAPrunerConfig = model.config.quantization_config
    start = time.perf_counter()
    with atomic_output(output, folder=True) as temporary:
        model.save_pretrained(temporary)
        processor.save_pretrained(temporary)
        model_card(config).save(str(temporary / "README.md"))
    timings = phase_lines(phase_seconds(model), load_seconds, time.perf_counter() - start, config)
    if args.push_to_hub:
        model.push_to_hub(args.push_to_hub, processor=processor)

    n = visual_tokens_per_image(model.config)
    k = resolve_budget(n, config.keep_ratio, config.keep_tokens) if config.prunes else n
    calibration = config.calibration_summary
    before, after = safetensors_bytes(name), safetensors_bytes(output)
    files = ", ".join(f"{f.name} ({_size(f.stat().st_size)})" for f in sorted(output.iterdir()) if f.is_file())
    lines = [
        f"Compressed {name} -> {output}",
        *(f"  {line[2:]}" for line in (*_describe_quantization(config), *_describe_pruning(config))),
        f"  Visual tokens reaching the language model: {n} -> {k} per image",
        "  Calibration: "
        + (
            f"{calibration['samples']} {calibration['source']} samples in {calibration['seconds']:.1f} s"
            if calibration
            else "none (no static activation ranges to calibrate)"
        ),
        *(
            [f"  GPTQ: {gptq['seconds']:.1f} s on {gptq['samples']} samples, output error "
             f"{100 * gptq['mean_error_reduction_vs_rtn']:.0f} % below round to nearest (mean over layers)"]
            if (gptq := (calibration or {}).get("gptq"))
            else []
        ),
        "  Seconds per phase:",
        *timings,
        f"  Size (safetensors): {_size(before)} -> {_size(after)}"
        + (f" ({after / before:.2f}x)" if before and after else ""),
        f"  Wrote {output}: {files}",
        *([f"  Pushed to https://huggingface.co/{args.push_to_hub}"] if args.push_to_hub else []),
        "  The saved processor emits all N placeholders per image (the model prunes them); for prompts with only K,",
        "  save optimum_qap.compact_processor(processor, model) instead.",
    ]
    print("\n".join(lines))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from .evaluation import format_table, load_eval_dataset, run_table

    name = resolve_model(args.model)
    output = Path(args.output) if args.output else None
    if output is not None:
        check_output(output)
    check_llava(name)
    dataset = load_eval_dataset(args.dataset, args.limit, args.data_file)
    processor = load_processor(name)
    base_alpha = "auto" if "auto" in args.alphas else args.alphas[0]  # "auto" makes the config name samples
    config = make_config(args, keep_ratio=args.keep_ratios[0], alpha=base_alpha)
    results = run_table(
        lambda cfg: load_model(name, args, cfg),
        processor,
        dataset,
        config,
        args.keep_ratios,
        args.alphas,
        args.batch_size,
        args.seed,
    )
    print(f"{dataset.name}: {len(dataset.items)} questions, model {name}")
    print(format_table(results))
    if output is not None:
        report = {
            "model": name,
            "dataset": dataset.name,
            "data_file": args.data_file,
            "questions": len(dataset.items),
            "config": config.to_dict(),
            "keep_ratios": args.keep_ratios,
            "alphas": args.alphas,
            "seed": args.seed,
            "rows": [r.to_dict() for r in results],
        }
        with atomic_output(output) as temporary:
            temporary.write_text(json.dumps(report, indent=2) + "\n")
        print(f"Wrote {output}")
    return 0


def visualize(args: argparse.Namespace) -> int:
    from .visualize import visualize_selection

    if args.model is None and args.image is not None and Path(args.image).is_dir():  # `visualize MODEL`: demo image
        args.model, args.image = args.image, None
    name = resolve_model(args.model)
    output = Path(args.output)
    check_output(output)
    image, prompt = image_and_prompt(args.image, args.prompt)
    check_llava(name, allow_quantized=True)
    processor = load_processor(name)
    model = load_model(name, args, None)
    saved = getattr(model.config, "quantization_config", None)
    base = saved.to_dict() if isinstance(saved, QAPrunerConfig) else dict(saved or {})
    options = {"keep_ratio": args.keep_ratio, "alpha": args.alpha, "semantic": args.semantic}
    changes = {k: v for k, v in options.items() if v is not None}
    if args.keep_ratio is not None:
        changes["keep_tokens"] = None
    config = QAPrunerConfig.from_dict({**base, **changes})
    figure = visualize_selection(model, processor, image, prompt, config)
    with atomic_output(output) as temporary:
        figure.save(temporary, format="PNG")
    print(f"Wrote {output} ({figure.width}x{figure.height}) for {prompt!r}: the model's kept tokens beside a contrast, "
          "S^P and S^Q")
    return 0


main = optimum_qap_cli.main  # `python -m optimum_qap.cli`, and callers of optimum_qap.cli.main


if __name__ == "__main__":
    sys.exit(main())
