"""Code copied from diffusers is still the installed (pinned) diffusers' code (``danceopd_diffusers.check_copies``),
and the check is real: an edited copied line fails it."""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import pytest

from danceopd_diffusers import check_copies
from danceopd_diffusers.pipelines import pipeline_qwenimage_edit_latents

QWEN_PACK = "diffusers.pipelines.qwenimage.pipeline_qwenimage.QwenImagePipeline._pack_latents"


def test_every_marked_block_matches_the_installed_diffusers():
    marked, problems = check_copies.check()
    assert not problems, "\n".join(problems)
    targets = {m.target.rsplit(".", 2)[-2] + "." + m.target.rsplit(".", 1)[-1] for m in marked}
    # the Qwen-Image-Edit loop and the exported omni source encoding are checked, not just present
    assert {"QwenImageEditPipeline.__call__", "ZImageOmniPipeline.prepare_image_latents"} <= targets


def _copied_file(tmp_path: Path, marker: str, code: str) -> Path:
    path = tmp_path / "copy.py"
    path.write_text(f"class Host:\n    {marker}\n" + textwrap.indent(code, "    "))
    return path


def _stock_method(target: str) -> str:
    return check_copies.stock_source(target)


def test_a_verbatim_copy_passes_and_an_edited_line_fails(tmp_path):
    code = _stock_method(QWEN_PACK)
    path = _copied_file(tmp_path, f"# Copied from {QWEN_PACK}", code)
    assert check_copies.check([path])[1] == []
    path = _copied_file(
        tmp_path, f"# Copied from {QWEN_PACK}", code.replace("(0, 2, 4, 1, 3, 5)", "(0, 2, 4, 1, 5, 3)")
    )
    (problem,) = check_copies.check([path])[1]
    assert "differs from " + QWEN_PACK in problem


def test_with_replacements_are_applied_to_the_stock_code(tmp_path):
    code = _stock_method(QWEN_PACK).replace("_pack_latents", "_pack_tokens")
    path = _copied_file(tmp_path, f"# Copied from {QWEN_PACK}", code)
    assert check_copies.check([path])[1], "a renamed copy without `with` must fail"
    path = _copied_file(tmp_path, f"# Copied from {QWEN_PACK} with _pack_latents->_pack_tokens", code)
    assert check_copies.check([path])[1] == []


def test_an_edit_outside_the_recorded_differences_of_an_adapted_block_fails(tmp_path):
    """The Qwen-Image-Edit loop differs from stock in recorded lines only: editing any other line fails."""
    source = Path(inspect.getfile(pipeline_qwenimage_edit_latents)).read_text()
    path = tmp_path / "adapted.py"
    path.write_text(source)
    assert check_copies.check([path])[1] == []
    edited = source.replace(
        "comb_pred = neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)",
        "comb_pred = noise_pred",
    )
    assert edited != source
    path.write_text(edited)
    (problem,) = check_copies.check([path])[1]
    assert "not the recorded ones" in problem and "comb_pred = noise_pred" in problem


def test_a_marker_above_nothing_is_an_error(tmp_path):
    path = tmp_path / "stray.py"
    path.write_text(f"# Copied from {QWEN_PACK}\nx = 1\n")
    with pytest.raises(ValueError, match="stands above no def or class"):
        check_copies.check([path])
