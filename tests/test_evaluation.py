"""Evaluation: dataset loaders on tiny local files, answer matching, Wilson intervals, the random baseline."""

import json
import math

import pytest
import tiny
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from optimum_qap import QAPrunerConfig, attach_pruner, last_selection
from optimum_qap.demo import make_dataset
from optimum_qap.evaluation import (
    Result,
    attach_random_pruner,
    format_table,
    load_eval_dataset,
    pope_correct,
    pope_normalize,
    scienceqa_correct,
    wilson_interval,
)
from optimum_qap.evaluation.datasets import demo_correct

SCIENCEQA_ROWS = {
    "question": ["Which animal is a mammal?", "What is the capital of France?", "Is ice a solid?"],
    "choices": [["frog", "dog", "eel"], ["Paris", "Rome"], ["yes", "no"]],
    "answer": [1, 0, 0],
    "hint": ["Mammals have fur.", "", None],
    "subject": ["natural science", "social science", "natural science"],
}


def scienceqa_file(folder) -> str:
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (20, 12), color) for color in ("red", "green", "blue")]
    path = folder / "scienceqa.parquet"
    datasets.Dataset.from_dict({"image": images, **SCIENCEQA_ROWS}).to_parquet(str(path))
    return str(path)


def pope_file(folder) -> str:
    pytest.importorskip("datasets")  # the loader reads the file with it
    rows = [
        {"image": "a.png", "question": "Is there a dog in the image?", "answer": "yes", "category": "random"},
        {"image": "b.png", "question": "Is there a car in the image?", "answer": "no", "category": "adversarial"},
    ]
    Image.new("RGB", (10, 10), "white").save(folder / "a.png")
    Image.new("L", (10, 10), 7).save(folder / "b.png")
    path = folder / "pope.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_scienceqa_prompts_answers_and_limit(tmp_path):
    data = load_eval_dataset("scienceqa", data_file=scienceqa_file(tmp_path))
    assert [i.text for i in data.items] == [
        "Context: Mammals have fur.\nWhich animal is a mammal?\nA. frog\nB. dog\nC. eel\n"
        "Answer with the option's letter from the given choices directly.",
        "What is the capital of France?\nA. Paris\nB. Rome\nAnswer with the option's letter from the given choices "
        "directly.",
        "Is ice a solid?\nA. yes\nB. no\nAnswer with the option's letter from the given choices directly.",
    ]
    assert [i.answer for i in data.items] == ["B", "A", "A"]
    assert [i.category for i in data.items] == SCIENCEQA_ROWS["subject"]
    assert data.items[0].image.mode == "RGB" and data.items[0].image.size == (20, 12)
    assert len(load_eval_dataset("scienceqa", limit=2, data_file=scienceqa_file(tmp_path)).items) == 2


def test_pope_jsonl_with_relative_image_paths(tmp_path):
    data = load_eval_dataset("pope", data_file=pope_file(tmp_path))
    assert [i.text for i in data.items] == [
        "Is there a dog in the image?\nAnswer the question using a single word or phrase.",
        "Is there a car in the image?\nAnswer the question using a single word or phrase.",
    ]
    assert [(i.answer, i.category) for i in data.items] == [("yes", "random"), ("no", "adversarial")]
    assert data.items[1].image.mode == "RGB"


def test_demo_items_are_the_test_split():
    data = load_eval_dataset("demo", limit=3)
    examples = make_dataset(3, "test")
    assert [(i.text, i.answer, i.category) for i in data.items] == [(e.question, e.answer, e.qtype) for e in examples]
    assert demo_correct("red circle", "red") and not demo_correct("blue", "red") and not demo_correct("", "red")


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no.", "no"),
        ("Yes, there is a dog.", "yes"),
        ("There is not a dog in the image.", "no"),
        ("No, there is no car", "no"),
        ("Yes. There is no cat.", "yes"),  # only the first sentence counts
        ("no,", "no"),  # commas are removed before splitting
        ("Nope", "yes"),  # LLaVA's rule: only the words "No", "no" and "not"
        ("", "yes"),
    ],
)
def test_pope_normalisation_matches_llava(prediction, expected):
    assert pope_normalize(prediction) == expected
    assert pope_correct(prediction, expected.upper())


def test_scienceqa_first_letter_match():
    assert scienceqa_correct("B", "B")
    assert scienceqa_correct(" B. dog", "B")
    assert not scienceqa_correct("A", "B")
    assert not scienceqa_correct("b", "B")
    assert not scienceqa_correct("", "B")


def test_loader_errors(tmp_path):
    pope = pope_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_eval_dataset("pope", data_file=str(tmp_path / "missing.parquet"))
    (tmp_path / "data.csv").write_text("a\n")
    with pytest.raises(ValueError, match=r"\.parquet, \.jsonl or \.json"):
        load_eval_dataset("pope", data_file=str(tmp_path / "data.csv"))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['choices'\]"):
        load_eval_dataset("scienceqa", data_file=pope)
    with pytest.raises(ValueError, match="data-file"):
        load_eval_dataset("demo", data_file=pope)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_eval_dataset("mmlu")


def test_wilson_interval_hand_computed():
    # 8/10: p=.8, z^2/n=.38415, center=(.8+.19207)/1.38415=.71683, half=1.96*sqrt(.016+.0096037)/1.38415=.22658
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    # 0/10: [0, (z^2/n) / (1 + z^2/n)] = [0, .38415/1.38415]
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((1 - 0.27753, 1.0), abs=1e-5)
    low, high = wilson_interval(50, 100)
    assert (low + high) / 2 == pytest.approx(0.5) and high - low == pytest.approx(2 * 0.09617, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_result_and_table():
    result = Result("W4A4 + QAPruner (alpha=0.5)", "qapruner", True, 4, 0.25, 0.5, hits=[True, False, True, True])
    assert result.accuracy == 0.75 and result.ci95 == wilson_interval(3, 4)
    low, high = result.ci95
    table = format_table([Result("FP dense", "none", False, 16, hits=[True]), result])
    row = f"| W4A4 + QAPruner (alpha=0.5) | 4 (25.0%) | 75.00 | 4 | {100 * low:.1f}-{100 * high:.1f} |"
    assert table.splitlines()[-1] == row
    assert table.splitlines()[2].startswith("| FP dense | 16 | 100.00 | 1 |")
    assert math.isnan(Result("x", "none", False, 1).accuracy)


def test_random_selection_is_seeded(tiny_repo):
    config = QAPrunerConfig(w_bits=16, a_bits=16, keep_ratio=0.25)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_repo, quantization_config=config)
    inputs = tiny.tiny_processor()(
        images=[tiny.noise_image(0), tiny.noise_image(1)],
        text=["USER: <image>\nwhat is in the image ? ASSISTANT:"] * 2,
        return_tensors="pt",
        padding=True,
    )

    def kept(seed=None):
        if seed is None:
            attach_pruner(model, config)
        else:
            attach_random_pruner(model, config, seed)
        with torch.no_grad():
            model(**inputs)
        return last_selection(model)

    reference = kept()
    first, again, other = kept(3), kept(3), kept(4)
    assert [s.kept.tolist() for s in first] == [s.kept.tolist() for s in again]
    assert [s.kept.tolist() for s in first] != [s.kept.tolist() for s in other]
    for selection, scored in zip(first, reference, strict=True):
        assert len(selection.kept) == 4 and selection.kept.tolist() == sorted(selection.kept.tolist())
        assert torch.equal(selection.semantic, scored.semantic)  # diagnostics are the real scores
    # the two images of one call get different draws
    assert first[0].kept.tolist() != first[1].kept.tolist()
