"""The `optimum-qap` command line, run in-process on a tiny saved LLaVA."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import tiny
import torch
from PIL import Image, ImageStat
from test_evaluation import scienceqa_file
from transformers import LlamaConfig, LlavaForConditionalGeneration

import optimum_qap.config
import optimum_qap.demo
import optimum_qap.hub
import optimum_qap_cli
from optimum_qap import QAPrunerConfig
from optimum_qap.cli import main
from optimum_qap.visualize import MIN_PANEL, contrast_config, figure_size, panel_box, panel_size


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a busy machine extra threads only contend (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def entries(folder):
    return sorted(os.listdir(folder))


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("optimum-qap: error: ")
    return lines[-1]


@pytest.fixture(scope="module")
def compressed(tiny_repo, tmp_path_factory):
    output = tmp_path_factory.mktemp("compressed") / "tiny-qap"
    assert main(["compress", tiny_repo, "--output", str(output), "--keep-ratio", "0.25", "--alpha", "0.3"]) == 0
    return output


def test_compress_saves_model_processor_and_card(compressed):
    assert entries(compressed.parent) == ["tiny-qap"]  # no temporary folder left beside it
    files = set(entries(compressed))
    assert {"config.json", "model.safetensors", "README.md", "processor_config.json", "tokenizer.json"} <= files
    config = json.loads((compressed / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["keep_ratio"], config["alpha"], config["calibration"]) == (
        "qap", 0.25, 0.3, None
    )
    model = LlavaForConditionalGeneration.from_pretrained(compressed)
    assert model.qap_pruner.budget(tiny.NUM_PATCHES) == 4


def test_compress_summary(tiny_repo, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["compress", tiny_repo, "--output", str(output), "--granularity", "static_per_tensor",
                 "--calib-samples", "2", "--w-bits", "8"]) == 0
    summary = capsys.readouterr().out
    assert f"Compressed {tiny_repo} -> {output}" in summary
    assert "Weights: 8-bit asymmetric" in summary and "static per tensor" in summary
    assert "Visual tokens reaching the language model: 16 -> 2 per image" in summary
    assert "Calibration: 2 builtin samples in" in summary
    before = sum(f.stat().st_size for f in os.scandir(tiny_repo) if f.name.endswith(".safetensors"))
    after = (output / "model.safetensors").stat().st_size
    assert f"({after / before:.2f}x)" in summary
    assert "model.safetensors (" in summary and "compact_processor" in summary
    saved = json.loads((output / "config.json").read_text())["quantization_config"]
    assert saved["calibration_summary"]["samples"] == 2
    phases = summary[summary.index("  Seconds per phase:\n"):].splitlines()[1:8]
    names = [line.rsplit(None, 1)[0].strip() for line in phases]
    assert names == ["load", "rotate (Hadamard)", "GPTQ", "quantize (round to nearest)", "calibrate activations",
                     "choose alpha", "save"]
    assert all(float(line.split()[-1]) >= 0 for line in phases) and "Load + quantize" not in summary


@pytest.mark.parametrize("fusion", ["weighted", "outlier_slots"])
def test_compress_chooses_auto_values_and_prints_the_curve(tiny_repo, tmp_path, capsys, fusion):
    output = tmp_path / "out"
    args = ["compress", tiny_repo, "--output", str(output), "--keep-ratio", "0.25", "--calib-samples", "2"]
    assert main([*args, "--alpha", "auto", "--fusion", fusion]) == 0
    summary = capsys.readouterr().out
    saved = json.loads((output / "config.json").read_text())["quantization_config"]
    name = "alpha" if fusion == "weighted" else "outlier slots"
    assert f"{name} chosen automatically on 2 calibration samples" in summary
    assert saved["auto_selection"]["samples"] == 2 and saved["token_statistics"]["tokens"] == 2 * 16


def test_compress_overwrite_and_push_to_hub(tiny_repo, tmp_path, monkeypatch, capsys):
    pushed = []
    monkeypatch.setattr(optimum_qap.hub, "push_to_hub", lambda model, repo, processor=None: pushed.append(repo))
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "stale.bin").write_bytes(b"old")
    argv = ["compress", tiny_repo, "--output", str(tmp_path / "o"), "--push-to-hub", "me/tiny-qap", "--overwrite"]
    assert main(argv) == 0
    assert pushed == ["me/tiny-qap"]
    assert "stale.bin" not in entries(tmp_path / "o") and entries(tmp_path) == ["o"]
    assert "Pushed to https://huggingface.co/me/tiny-qap" in capsys.readouterr().out


def test_eval_table_and_json(tiny_repo, tmp_path, capsys):
    data, output = scienceqa_file(tmp_path), tmp_path / "results.json"
    argv = ["eval", tiny_repo, "--dataset", "scienceqa", "--data-file", data, "--keep-ratios", "0.25",
            "--alphas", "0.3,0.7", "--batch-size", "2", "--output", str(output)]
    assert main(argv) == 0
    names = ["FP dense", "W4A4 dense", "W4A4 + random", "W4A4 + semantic (alpha=1)", "W4A4 + QAPruner (alpha=0.3)",
             "W4A4 + QAPruner (alpha=0.7)"]
    report = json.loads(output.read_text())
    assert [r["name"] for r in report["rows"]] == names
    assert [r["visual_tokens"] for r in report["rows"]] == [16, 16, 4, 4, 4, 4]
    assert [r["keep_ratio"] for r in report["rows"]] == [None, None, 0.25, 0.25, 0.25, 0.25]
    assert all(r["n"] == 3 and len(r["predictions"]) == 3 for r in report["rows"])
    assert all(0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1 for r in report["rows"])
    assert report["questions"] == 3 and report["dataset"] == "scienceqa"
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert table[0] == "| method | visual tokens | accuracy (%) | n | 95% CI (%) |" and len(table) == 2 + len(names)
    assert table[-1].startswith("| W4A4 + QAPruner (alpha=0.7) | 4 (25.0%) | ")
    assert entries(tmp_path) == sorted(["results.json", "scienceqa.parquet"])


def test_eval_demo_with_static_activations(tiny_repo, capsys):
    argv = ["eval", tiny_repo, "--limit", "2", "--keep-ratios", "0.5", "--alphas", "0",
            "--granularity", "static_per_channel", "--calib-samples", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"demo: 2 questions, model {tiny_repo}\n")
    assert "| W4A4 + QAPruner (alpha=0) | 8 (50.0%) | " in out


def test_eval_alpha_auto_row_is_chosen_per_keep_ratio(tiny_repo, capsys, monkeypatch):
    chosen = []
    select = optimum_qap.evaluation.runner.select_fusion

    def recording(model, processor, samples, **kwargs):
        record = select(model, processor, samples, **kwargs)
        chosen.append((model.qap_pruner.budget(tiny.NUM_PATCHES), len(samples), record["alpha"]))
        return record

    monkeypatch.setattr(optimum_qap.evaluation.runner, "select_fusion", recording)
    argv = ["eval", tiny_repo, "--limit", "2", "--keep-ratios", "0.5,0.25", "--alphas", "0.5,auto", "--calib-samples",
            "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert [(k, n) for k, n, _ in chosen] == [(8, 2), (4, 2)]
    for k, ratio, (_, _, alpha) in zip((8, 4), ("50.0%", "25.0%"), chosen, strict=True):
        assert f"| W4A4 + QAPruner (alpha=auto -> {alpha:g}) | {k} ({ratio}) | " in out
    assert "| W4A4 + QAPruner (alpha=0.5) | 8 (50.0%) | " in out


def kept_cells(png, side: int, grid: int = 4) -> int:
    """Cells of the model's selection panel at full colour (pruned ones are faded towards white)."""
    x0, y0, _, _ = panel_box(0, side)
    panel, cell = png.crop((x0, y0, x0 + side, y0 + side)).convert("L"), side // grid
    means = [ImageStat.Stat(panel.crop((cell * (i % grid) + 3, cell * (i // grid) + 3, cell * (i % grid + 1) - 3,
                                        cell * (i // grid + 1) - 3))).mean[0] for i in range(grid * grid)]
    return sum(m < 170 for m in means)


def test_visualize_writes_png(tiny_repo, tmp_path, capsys):
    image, output = tmp_path / "in.png", tmp_path / "kept.png"
    tiny.noise_image(3, size=80).save(image)
    argv = ["visualize", str(image), tiny_repo, "--prompt", "what is in the image ?", "--output", str(output),
            "--keep-ratio", "0.25", "--alpha", "0.5"]
    assert main(argv) == 0
    side = panel_size(4, tiny.IMAGE_SIZE)
    assert side == MIN_PANEL  # 4 x 4 patches of 64 pixels
    with Image.open(output) as png:
        assert png.format == "PNG" and png.size == figure_size(side)
        assert kept_cells(png, side) == 4  # 4 of 16 patches kept at full colour, the rest faded
    assert entries(tmp_path) == ["in.png", "kept.png"]
    assert "for 'what is in the image ?'" in capsys.readouterr().out


def test_visualize_without_an_image_uses_a_demo_image_and_its_question(tiny_repo, tmp_path, capsys):
    output = tmp_path / "kept.png"
    assert main(["visualize", tiny_repo, "--output", str(output), "--keep-ratio", "0.5"]) == 0
    question = optimum_qap.demo.make_dataset(1, "test")[0].question
    assert f"for {question!r}" in capsys.readouterr().out
    with Image.open(output) as png:
        assert kept_cells(png, panel_size(4, tiny.IMAGE_SIZE)) == 8
    assert main(["visualize", str(tmp_path / "kept.png"), tiny_repo]) == 2  # an image of one's own needs a question
    assert "--prompt is required with an IMAGE" in capsys.readouterr().err


@pytest.mark.parametrize(
    "fields, chosen, contrast",
    [
        ({"alpha": 0.3}, {"alpha": 0.3}, ("semantic only (alpha=1)", 1.0)),  # the model fuses: show semantic only
        ({"alpha": 1.0}, {"alpha": 1.0}, ("QAPruner (alpha=0.7)", 0.7)),  # the model is semantic: show QAPruner
        ({"fusion": "outlier_slots", "outlier_slots": 0}, {"outlier_slots": 0}, ("QAPruner (alpha=0.7)", 0.7)),
        ({"fusion": "outlier_slots", "outlier_slots": 2}, {"outlier_slots": 2}, ("semantic only (alpha=1)", 1.0)),
    ],
)
def test_visualize_contrasts_the_models_selection_with_a_different_one(fields, chosen, contrast):
    config = QAPrunerConfig(keep_ratio=0.25, token_statistics={"range_median": 1.0, "error_median": 1.0}, **fields)
    label, other = contrast_config(config, chosen)
    assert (label, other.alpha, other.fusion) == (*contrast, "weighted")


def test_visualize_a_compressed_model_uses_its_settings(compressed, tmp_path, capsys):
    image = tmp_path / "in.png"
    tiny.noise_image(5).save(image)
    argv = ["visualize", str(image), str(compressed), "--prompt", "describe", "--output", str(tmp_path / "k.png")]
    assert main(argv) == 0
    with Image.open(tmp_path / "k.png") as png:
        assert kept_cells(png, panel_size(4, tiny.IMAGE_SIZE)) == 4  # the saved keep_ratio 0.25


def test_help_and_argument_errors_come_before_torch_and_transformers_load():
    # what the console script runs; --help, a bad choice and --version must not import the heavy stack
    for argv in (["--help"], ["compress", "--help"], ["compress", "--w-bits", "5"], ["--version"]):
        code = (
            f"import sys\nfrom optimum_qap_cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in ('torch', 'transformers', 'optimum_qap', 'PIL') if m in sys.modules))"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert result.stdout.strip().splitlines()[-1] == "LOADED []", (argv, result.stdout, result.stderr)
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "optimum-qap"]
    assert script.value == "optimum_qap_cli:main"


def test_parser_choices_are_the_configs():
    for name in ("WEIGHT_BITS", "ACTIVATION_BITS", "ACTIVATION_GRANULARITIES", "SEMANTIC_SCORES", "WEIGHT_METHODS",
                 "FUSIONS", "DEFAULT_ALPHA"):
        assert getattr(optimum_qap_cli, name) == getattr(optimum_qap.config, name), name


def not_llava(folder):
    LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, vocab_size=10).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compress", "{tmp}/missing", "--output", "{tmp}/out"], "model folder {tmp}/missing does not exist"),
        (["compress", "{llama}", "--output", "{tmp}/out"], "is a 'llama' model; optimum-qap needs a LLaVA model"),
        (["compress", "{tmp}", "--output", "{tmp}/out"], "has no config.json"),
        (["compress", "{tiny}", "--output", "{tmp}/file.txt/out"], "folder {tmp}/file.txt does not exist"),
        (["compress", "{tiny}", "--output", "{tmp}/file.txt"], "it exists and is a file"),
        (["compress", "{tiny}", "--output", "{tmp}/existing"], "{tmp}/existing exists; pass --overwrite"),
        (["compress", "{compressed}", "--output", "{tmp}/out"], "is already quantized"),
        (["compress", "{tiny}", "--keep-ratio", "0"], "argument --keep-ratio: a keep ratio must be in (0, 1], got 0"),
        (["compress", "{tiny}", "--alpha", "nan"], "argument --alpha: expected a number, got 'nan'"),
        (["compress", "{tiny}", "--w-bits", "5"], "argument --w-bits: invalid choice: 5"),
        (["eval", "{tiny}", "--keep-ratios", "0.5,abc"], "argument --keep-ratios: expected a number, got 'abc'"),
        (["eval", "{tiny}", "--alphas", "0.5,1.5"], "argument --alphas: alpha must be in [0, 1], got 1.5"),
        (["eval", "{tiny}", "--limit", "0"], "argument --limit: expected a positive integer, got '0'"),
        (["eval", "{tiny}", "--output", "{tmp}/no/results.json"], "folder {tmp}/no does not exist"),
        (["eval", "{tiny}", "--dataset", "pope", "--data-file", "{tmp}/x.jsonl"], "data file {tmp}/x.jsonl does not"),
        (["visualize", "{tmp}/file.txt", "{tiny}", "--prompt", "x", "--output", "{tmp}/k.png"], "cannot read image"),
        (["visualize", "{tmp}/file.txt", "{tiny}"], "--prompt is required with an IMAGE"),
        ([], "the following arguments are required"),
    ],
)
def test_errors_exit_2_with_one_line_and_leave_nothing(argv, message, tmp_path, tiny_repo, compressed, capsys):
    (tmp_path / "file.txt").write_text("not an image\n")
    (tmp_path / "existing").mkdir()
    fields = {"tmp": tmp_path, "tiny": tiny_repo, "compressed": compressed, "llama": not_llava(tmp_path / "llama")}
    before = entries(tmp_path)
    capsys.readouterr()
    assert main([arg.format(**fields) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("optimum-qap: error: ") and message.format(**fields) in err
    assert entries(tmp_path) == before


def test_failed_save_leaves_nothing_behind(tiny_repo, tmp_path, monkeypatch, capsys):
    def broken_save(self, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(LlavaForConditionalGeneration, "save_pretrained", broken_save)
    assert main(["compress", tiny_repo, "--output", str(tmp_path / "out")]) == 2
    assert error_line(capsys) == "optimum-qap: error: No space left on device"
    assert entries(tmp_path) == []


def test_version_and_auto_in_any_case(capsys):
    from optimum_qap_cli import alpha_or_auto

    with pytest.raises(SystemExit) as exit_code:
        main(["--version"])
    assert exit_code.value.code == 0 and capsys.readouterr().out.strip() == f"optimum-qap {optimum_qap.__version__}"
    assert alpha_or_auto("Auto") == alpha_or_auto(" AUTO ") == "auto" and alpha_or_auto("0.5") == 0.5
    assert main(["eval", "--alphas", "0.7,x"]) == 2
    assert "(or auto)" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["compress"], ["eval"], ["visualize"]])
def test_an_unwritable_output_fails_before_anything_loads(command, tmp_path, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("loaded before the output was checked")

    for name in ("check_llava", "load_processor", "load_model"):
        monkeypatch.setattr(optimum_qap.cli, name, must_not_run)
    assert main([*command, "--output", str(tmp_path / "missing" / "out")]) == 2
    assert f"cannot write {tmp_path / 'missing' / 'out'}: folder" in capsys.readouterr().err
