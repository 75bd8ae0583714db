"""`optimum-qap`: compress a LLaVA model, evaluate compressed settings, draw which visual tokens are kept.

    optimum-qap compress [MODEL] [--w-bits 4 --a-bits 4 --granularity per_token --keep-ratio 0.125 ...]
    optimum-qap eval [MODEL] [--dataset demo|scienceqa|pope --keep-ratios 0.5,0.25,0.125 --alphas 0.7 ...]
    optimum-qap visualize [IMAGE [MODEL]] [--prompt TEXT --output kept.png --keep-ratio --alpha]

MODEL is a local folder or a Hub id and defaults to the shipped shapes-VQA demo model. A user error prints one line
on stderr and exits with status 2; outputs are written under a temporary name beside the target and renamed into
place, so a failed run leaves nothing half-written.

This package holds the console script's argument parser and uses the standard library only: `import optimum_qap`
imports transformers and torch (it registers `QAPrunerConfig` with transformers, ~3 s), so `--help`, `--version`
and argument errors are answered before that, and the subcommands in `optimum_qap.cli` are imported after parsing.
The option choices repeat `optimum_qap.config`'s (tests/test_cli.py checks that they agree).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

# the values QAPrunerConfig accepts (optimum_qap.config), for the parser; kept equal by tests/test_cli.py
WEIGHT_BITS = (2, 3, 4, 8, 16)
ACTIVATION_BITS = (2, 3, 4, 8, 16)
ACTIVATION_GRANULARITIES = ("per_token", "per_group", "static_per_channel", "static_per_tensor")
SEMANTIC_SCORES = ("cls_attention", "cdpruner")
WEIGHT_METHODS = ("rtn", "gptq")
FUSIONS = ("weighted", "outlier_slots")
DEFAULT_ALPHA = 0.7
DTYPES = ("auto", "float32", "bfloat16", "float16")


class CliError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise CliError(f"{message} (see `{self.prog} --help`)")


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
        choices=FUSIONS,
        default="weighted",
        help="weighted (the paper's S) or outlier_slots (m slots for calibrated outlier tokens, m auto)",
    )
    p.add_argument("--output", metavar="DIR", help="output folder (default: <model name>-qap)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload to this Hub repo")
    p.set_defaults(handler="compress")

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
    p.set_defaults(handler="evaluate")

    p = commands.add_parser("visualize", help="PNG of the visual tokens the model keeps, a contrast and the scores")
    p.add_argument(
        "image", nargs="?", help="image file (default: a shipped demo image and its question; a folder is MODEL)"
    )
    p.add_argument("model", nargs="?", help=model_help)
    p.add_argument("--prompt", help="the question asked about the image (needed with IMAGE)")
    p.add_argument("--output", default="kept.png", help="PNG to write (default kept.png)")
    p.add_argument("--keep-ratio", type=keep_ratio, help="share of visual tokens kept (default: the model's or 0.125)")
    p.add_argument("--alpha", type=alpha, help="QAPruner's alpha (default: the model's or QAPrunerConfig's)")
    p.add_argument("--semantic", choices=SEMANTIC_SCORES, help="semantic score S^P (default cls_attention)")
    _model_options(p)
    p.set_defaults(handler="visualize")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `optimum-qap` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        from optimum_qap import cli  # torch and transformers: only once the arguments are known to be valid

        return getattr(cli, args.handler)(args)
    except (CliError, ImportError, OSError, ValueError) as error:
        print(f"optimum-qap: error: {first_line(error)}", file=sys.stderr)
        return 2
