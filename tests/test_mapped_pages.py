"""Pages of dropped, memory-mapped float weights go back to the OS; memory anyone still uses is never touched."""

import sys

import pytest
import tiny
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import LlavaForConditionalGeneration

from optimum_qap import QAPrunerConfig, mapped_pages
from optimum_qap.mapped_pages import in_private_file_mapping, released_when_dropped

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")

ROWS, COLUMNS = 512, 1024  # 2 MiB of float32: 512 whole pages


def mapping_rss(address: int) -> int:
    """Resident bytes (file and copy-on-write pages) of the mapping that holds ``address``."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                low, high = (int(bound, 16) for bound in fields[0].split("-"))
                inside = low <= address < high
            elif inside and fields[0] == "Rss:":
                return int(fields[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.fixture
def checkpoint(tmp_path):
    path = str(tmp_path / "weights.safetensors")
    save_file({"bias": torch.ones(16), "weight": torch.zeros(ROWS, COLUMNS)}, path)
    # the open file keeps its mapping alive, as the vision tower's weights do in a loaded model
    with safe_open(path, framework="pt") as opened:
        yield opened


def mapped_weight(checkpoint) -> torch.Tensor:
    """The weight as transformers materializes it: a view into the file's mapping."""
    return checkpoint.get_slice("weight")[...]


def test_a_dropped_mapped_weight_leaves_resident_memory(checkpoint):
    weight = mapped_weight(checkpoint)
    address = weight.data_ptr()
    assert in_private_file_mapping(address, weight.nbytes)
    weight.add_(1)  # as the rotation does: copy-on-write pages
    before = mapping_rss(address)
    with released_when_dropped([weight]) as release:
        del weight
    assert release.released_bytes >= ROWS * COLUMNS * 4 - 2 * 4096
    assert before - mapping_rss(address) >= release.released_bytes


@pytest.mark.parametrize("keep", [lambda w: w[1:], lambda w: w.untyped_storage(), nn.Parameter, lambda w: w.numpy()],
                         ids=["view", "storage", "parameter", "numpy"])
def test_a_weight_still_in_use_keeps_its_pages_and_values(checkpoint, keep):
    weight = mapped_weight(checkpoint)
    weight.fill_(3)  # copy-on-write pages: releasing them would bring back the file's zeros
    kept = keep(weight)
    with released_when_dropped([weight]) as release:
        del weight
    assert release.released_bytes == 0
    values = torch.empty(0).set_(kept) if isinstance(kept, torch.UntypedStorage) else torch.as_tensor(kept)
    assert bool((values == 3).all())


def test_memory_that_is_not_file_mapped_is_never_released():
    weight = torch.full((ROWS, COLUMNS), 3.0)
    assert not in_private_file_mapping(weight.data_ptr(), weight.nbytes)
    with released_when_dropped([weight, torch.empty(ROWS, COLUMNS, device="meta")]) as release:
        del weight
    assert release.released_bytes == 0


def test_elsewhere_than_linux_nothing_is_released(checkpoint, monkeypatch):
    weight = mapped_weight(checkpoint)
    monkeypatch.setattr(sys, "platform", "darwin")
    with released_when_dropped([weight]) as release:
        del weight
    assert release.released_bytes == 0


def test_nothing_is_released_when_the_block_raises(checkpoint):
    weight = mapped_weight(checkpoint)
    with pytest.raises(RuntimeError), released_when_dropped([weight]) as release:
        raise RuntimeError("swap failed")
    assert release.released_bytes == 0 and bool((weight == 0).all())


def _bytes(state: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {name: tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for name, tensor in state.items()}


@pytest.mark.parametrize("config", [{}, {"calibration": "builtin", "num_calibration_samples": 2,
                                                            "w_group_size": 32, "keep_ratio": 1.0}],
                         ids=["rotation-rtn", "rotation-gptq"])
def test_a_quantized_load_releases_the_decoder_pages_and_keeps_every_buffer(tmp_path, monkeypatch, config):
    tiny.tiny_llava(hidden=256).save_pretrained(tmp_path)
    tiny.tiny_processor().save_pretrained(tmp_path)
    monkeypatch.setattr(mapped_pages, "_madvise_dontneed", lambda start, length: False)
    kept = LlavaForConditionalGeneration.from_pretrained(tmp_path, quantization_config=QAPrunerConfig(**config))
    monkeypatch.undo()
    released = LlavaForConditionalGeneration.from_pretrained(tmp_path, quantization_config=QAPrunerConfig(**config))

    assert _bytes(released.state_dict()) == _bytes(kept.state_dict())
    decoder = [m for name, m in tiny.tiny_llava(hidden=256).named_modules()
               if ".language_model.layers." in name and isinstance(m, nn.Linear)]
    decoder_bytes = sum(m.weight.nbytes for m in decoder)
    anchor = "model.multi_modal_projector.linear_1.weight"  # mapped, left float in both
    kept_rss = mapping_rss(kept.get_parameter(anchor).data_ptr())
    released_rss = mapping_rss(released.get_parameter(anchor).data_ptr())
    assert kept_rss - released_rss >= 0.9 * decoder_bytes
