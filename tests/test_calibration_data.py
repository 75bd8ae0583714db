"""Calibration samples as PIL images, datasets and chat conversations; what config.json keeps of them; a processor
passed for checkpoints that have none."""

import json

import datasets
import pytest
import tiny
import torch
from transformers import LlavaForConditionalGeneration

import optimum_qap
from optimum_qap import QAPrunerConfig
from optimum_qap.calibration_data import IN_MEMORY, to_samples
from optimum_qap.quant.linear import QuantLinear

PROMPTS = ("what colors ?", "how many shapes are there ?")


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = [str(folder / f"{i}.png") for i in range(2)]
    for i, path in enumerate(paths):
        tiny.noise_image(i).save(path)
    return paths


def forms(paths):
    images = [tiny.noise_image(i) for i in range(2)]
    chat = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
            for image, prompt in zip(images, PROMPTS, strict=True)]
    table = datasets.Dataset.from_dict({"image": images, "question": list(PROMPTS)}).cast_column(
        "image", datasets.Image()
    )
    return {
        "pil dicts": [{"image": image, "text": prompt} for image, prompt in zip(images, PROMPTS, strict=True)],
        "chat": chat,
        "chat with paths": [[{**m, "content": [{"type": "image", "path": path}, m["content"][1]]} for m in c]
                            for c, path in zip(chat, paths, strict=True)],
        "dataset": table,
    }


def ranges(model):
    return [torch.cat((m.input_min, m.input_max)) for m in model.modules() if isinstance(m, QuantLinear)]


def load(repo, calibration, **kwargs):
    config = QAPrunerConfig(keep_ratio=0.25, a_granularity="static_per_tensor", calibration=calibration, alpha=0.5,
                            weight_method="rtn", **kwargs)
    return LlavaForConditionalGeneration.from_pretrained(repo, quantization_config=config)


def test_every_form_gives_the_samples_of_the_path_dicts(image_files):
    for name, value in forms(image_files).items():
        samples = to_samples(value, limit=32)
        assert [s["text"] for s in samples] == list(PROMPTS), name
        for sample, seed in zip(samples, range(2), strict=True):
            image = optimum_qap.calibration._load_image(sample["image"])
            assert image.tobytes() == tiny.noise_image(seed).tobytes(), name
    assert len(to_samples(forms(image_files)["dataset"], limit=1)) == 1  # a dataset gives its first rows
    images = to_samples([tiny.noise_image(0)] * 5, limit=32)
    assert [s["text"] for s in images][:4] == list(optimum_qap.calibration_data.CALIBRATION_PROMPTS)
    answer = [{"role": "user", "content": [{"type": "image", "image": image_files[0]}, {"type": "text", "text": "q"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    assert to_samples([answer], 32) == [{"image": image_files[0], "text": "q", "answer": "red"}]


def test_in_memory_calibration_matches_path_calibration_and_is_not_saved(tiny_repo, image_files, tmp_path):
    reference = ranges(load(tiny_repo, [{"image": p, "text": t} for p, t in zip(image_files, PROMPTS, strict=True)]))
    for name in ("chat", "dataset"):
        model = load(tiny_repo, forms(image_files)[name])
        assert all(torch.equal(a, b) for a, b in zip(ranges(model), reference, strict=True)), name
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved["calibration"] == IN_MEMORY and saved["calibration_summary"]["source"] == IN_MEMORY
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved")  # needs none of the images
    assert all(torch.equal(a, b) for a, b in zip(ranges(reloaded), reference, strict=True))
    with pytest.raises(ValueError, match='calibration="in_memory" records that this model was calibrated on in-mem'):
        LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=QAPrunerConfig.from_dict(saved))


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        ([{"image": 3, "text": "x"}], r"has no image \(PIL image, path"),
        ([{"image": "a.png"}], r"has no prompt under one of \['text', 'question'"),
        ([7], "got a int"),
        (datasets.Dataset.from_dict({"picture": ["a"], "text": ["x"]}), "a dataset needs an 'image' column"),
    ],
)
def test_bad_calibration_samples_name_the_problem(calibration, message):
    with pytest.raises(ValueError, match=r"QAPrunerConfig\.calibration=(.|\n)*" + message):
        QAPrunerConfig(calibration=calibration)


def test_a_checkpoint_without_processor_files_calibrates_with_a_given_processor(tmp_path):
    folder = tmp_path / "no-processor"
    tiny.tiny_llava().save_pretrained(folder)
    with pytest.raises(ValueError, match=r"pass it as QAPrunerConfig\(\.\.\., processor=processor\)"):
        load(folder, "builtin", num_calibration_samples=2)
    model = load(folder, "builtin", num_calibration_samples=2, processor=tiny.tiny_processor())
    assert model.config.quantization_config.calibration_summary["samples"] == 2
    assert "processor" not in model.config.quantization_config.to_dict()
