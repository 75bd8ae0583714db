"""`optimum-qap`: compress a LLaVA model, evaluate compressed settings, draw which visual tokens are kept.

    optimum-qap compress [MODEL] [--w-bits 4 --a-bits 4 --granularity per_token --keep-ratio 0.125 ...]
    optimum-qap eval [MODEL] [--dataset demo|scienceqa|pope --keep-ratios 0.5,0.25,0.125 --alphas 0.7 ...]
    optimum-qap visualize IMAGE [MODEL] --prompt TEXT [--output kept.png --keep-ratio --alpha]

MODEL is a local folder or a Hub id and defaults to the shipped shapes-VQA demo model. A user error prints one line
on stderr and exits with status 2; outputs are written under a temporary name beside the target and renamed into
place, so a failed run leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from .atomic import atomic_output
from .config import (
    ACTIVATION_BITS,
    ACTIVATION_GRANULARITIES,
    DEFAULT_ALPHA,
    SEMANTIC_SCORES,
    STATIC_GRANULARITIES,
    WEIGHT_BITS,
    WEIGHT_METHODS,
    QAPrunerConfig,
)

DTYPES = ("auto", "float32", "bfloat16", "float16")


class CliError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise CliError(f"{message} (see `{self.prog} --help`)")


# ----------------------------------------------------------------------------- argument types


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


def keep_ratio(text: str) -> float:
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"a keep ratio must be in (0, 1], got {text}")
    return value


def alpha(text: str) -> float:
    value = _float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"alpha must be in [0, 1], got {text}")
    return value


def alpha_or_auto(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return alpha(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error} (or auto)") from error


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def comma_list(item: Callable[[str], float]) -> Callable[[str], list[float]]:
    def parse(text: str) -> list[float]:
        values = [item(part.strip()) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
        return values

    return parse


# ----------------------------------------------------------------------------- models, files


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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


def compress(args: argparse.Namespace) -> int:
    from .hub import _describe_pruning, _describe_quantization, model_card
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
    with atomic_output(output, folder=True) as temporary:
        model.save_pretrained(temporary)
        processor.save_pretrained(temporary)
        model_card(config).save(str(temporary / "README.md"))
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
        f"  Load + quantize: {load_seconds:.1f} s",
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

    name = resolve_model(args.model)
    output = Path(args.output)
    check_output(output)
    image = open_image(args.image)
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
    figure = visualize_selection(model, processor, image, args.prompt, config)
    with atomic_output(output) as temporary:
        figure.save(temporary, format="PNG")
    alpha = (config.auto_selection or {}).get("alpha", config.alpha)  # an "auto" alpha prints its chosen value
    print(f"Wrote {output} ({figure.width}x{figure.height}): kept tokens at alpha=1 and {alpha:g}, S^P, S^Q")
    return 0


# ----------------------------------------------------------------------------- parser


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--device", help="device to run on, e.g. cuda or cpu (default: cuda when available)")


def _quant_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--w-bits", type=int, choices=WEIGHT_BITS, default=4, help="weight bits (default 4)")
    parser.add_argument("--a-bits", type=int, choices=ACTIVATION_BITS, default=4, help="activation bits (default 4)")
    parser.add_argument(
        "--granularity",
        choices=ACTIVATION_GRANULARITIES,
        default="per_token",
        help="activation quantization granularity (static ones are calibrated)",
    )
    parser.add_argument(
        "--no-rotation", action="store_true", help="quantize without the Hadamard rotation (plain RTN W4A4 of format 1)"
    )
    parser.add_argument(
        "--weight-method",
        choices=WEIGHT_METHODS,
        help="rtn or gptq (default: gptq when calibrating, else rtn; gptq calibrates on built-in samples)",
    )
    parser.add_argument("--semantic", choices=SEMANTIC_SCORES, default="cls_attention", help="semantic score S^P")
    parser.add_argument(
        "--clip-text-model",
        metavar="ID",
        help="with --semantic cdpruner: a CLIP checkpoint whose text tower reads the instruction (CDPruner's original)",
    )
    parser.add_argument(
        "--calib-samples",
        type=positive_int,
        metavar="N",
        help="calibrate on this many built-in samples (default: 32 when calibrating, e.g. for static granularities)",
    )
    _model_options(parser)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("optimum-qap")
    except PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="optimum-qap", description="QAPruner: W4A4 LLaVA with quantization-aware token pruning.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{compress,eval,visualize}")
    model_help = "local folder or Hub id of a LLaVA model (default: the shipped demo model)"

    p = commands.add_parser("compress", help="quantize + attach pruning, save model and processor")
    p.add_argument("model", nargs="?", help=model_help)
    _quant_options(p)
    p.add_argument("--keep-ratio", type=keep_ratio, default=0.125, help="share of visual tokens kept (0.125)")
    p.add_argument(
        "--alpha",
        type=alpha_or_auto,
        help=f'S = alpha S^P + (1 - alpha) S^Q; "auto" chooses it on the calibration samples (default: "auto" when '
        f"calibrating, else {DEFAULT_ALPHA})",
    )
    p.add_argument(
        "--fusion",
        choices=("weighted", "outlier_slots"),
        default="weighted",
        help="weighted (the paper's S) or outlier_slots (m slots for calibrated outlier tokens, m auto)",
    )
    p.add_argument("--output", metavar="DIR", help="output folder (default: <model name>-qap)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload to this Hub repo")
    p.set_defaults(handler=compress)

    p = commands.add_parser("eval", help="accuracy table: FP, W4A4, random / semantic / QAPruner pruning")
    p.add_argument("model", nargs="?", help=model_help)
    p.add_argument(
        "--dataset",
        choices=("demo", "scienceqa", "pope"),
        default="demo",
        help="demo (shapes VQA), scienceqa (lmms-lab/ScienceQA, ScienceQA-IMG) or pope (lmms-lab/POPE)",
    )
    p.add_argument("--data-file", metavar="PATH", help="local parquet/jsonl file in the same schema (not the Hub)")
    p.add_argument("--limit", type=positive_int, metavar="N", help="first N questions (default: all; 200 for demo)")
    p.add_argument(
        "--keep-ratios",
        type=comma_list(keep_ratio),
        default=[0.5, 0.25, 0.125],
        metavar="R1,R2,...",
        help="keep ratios of the pruned rows (default 0.5,0.25,0.125)",
    )
    p.add_argument(
        "--alphas",
        type=comma_list(alpha_or_auto),
        default=[DEFAULT_ALPHA],
        metavar="A1,A2,...",
        help=f'QAPruner alphas, one row each per keep ratio; "auto" lets the model choose (default {DEFAULT_ALPHA})',
    )
    _quant_options(p)
    p.add_argument("--batch-size", type=positive_int, default=8, help="questions per generate call (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-selection baseline")
    p.add_argument("--output", metavar="JSON", help="write the rows (with predictions) to this JSON file")
    p.set_defaults(handler=evaluate)

    p = commands.add_parser("visualize", help="PNG of the tokens kept by the semantic pruner and by QAPruner")
    p.add_argument("image", help="image file")
    p.add_argument("model", nargs="?", help=model_help)
    p.add_argument("--prompt", required=True, help="the question asked about the image")
    p.add_argument("--output", default="kept.png", help="PNG to write (default kept.png)")
    p.add_argument("--keep-ratio", type=keep_ratio, help="share of visual tokens kept (default: the model's or 0.125)")
    p.add_argument("--alpha", type=alpha, help="QAPruner's alpha (default: the model's or QAPrunerConfig's)")
    p.add_argument("--semantic", choices=SEMANTIC_SCORES, help="semantic score S^P (default cls_attention)")
    _model_options(p)
    p.set_defaults(handler=visualize)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `optimum-qap` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except (CliError, ImportError, OSError, ValueError) as error:
        print(f"optimum-qap: error: {_first_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
