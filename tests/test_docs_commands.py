"""Every `p3b-deploy` command in README.md and docs/ exists as written: stage, flags, choices.

The commands are checked against the real parser (`p3b_deploy.cli.build_parser`, which imports no
torch), so renaming a flag or a choice without updating the docs fails here.
"""
from __future__ import annotations

import pytest

from docs_commands import REPO, Command, build_parser, commands_in, commands_in_markdown, markdown_files, problems


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def _check(text: str, parser) -> list[str]:
    return [p for c in commands_in(text, "fabricated.md") for p in problems(c, parser)]


def test_every_documented_command_matches_the_parser(parser):
    cmds = [c for f in markdown_files() for c in commands_in_markdown(f)]
    bad = [f"{c.source}: {c.text}\n    {p}" for c in cmds for p in problems(c, parser)]
    assert not bad, "commands in the docs that the CLI does not accept:\n" + "\n".join(bad)
    # the reader found the commands at all: every stage is documented with a command
    stages = {c.argv[0] for c in cmds if c.argv}
    assert stages >= {"prune", "slim", "finetune", "export", "bench", "run", "serve", "inspect",
                      "latency-pack", "latency-table"}
    assert len(cmds) >= 40


def test_readme_keeps_both_quick_start_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert "bash scripts/setup.sh && .venv/bin/p3b-deploy run" in text
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest" in text  # .ci/run runs this line
    assert len(text.splitlines()) <= 200
    quick = [c for c in commands_in_markdown(REPO / "README.md") if c.argv == ("run",)]
    assert quick and quick[0].text == ".venv/bin/p3b-deploy run"


def test_a_renamed_flag_is_reported(parser):
    text = "p3b-deploy prune --model vit_nano_patch4_16 --data digits --prune-ratoi 0.5 --out runs/x\n"
    assert _check(text, parser) == ["prune: unknown flag --prune-ratoi"]


def test_a_flag_of_another_stage_is_reported(parser):
    assert _check("p3b-deploy slim runs/p3b50 --out s --epochs 3", parser) == ["slim: unknown flag --epochs"]


def test_a_wrong_choice_is_reported_also_in_synopsis_alternatives(parser):
    assert _check("p3b-deploy prune --budget flops --out r", parser) == [
        "prune: --budget 'flops' is not one of ['latency', 'macs', 'params']"]
    out = _check("p3b-deploy slim r --out s [--residual-io index|gather|...]", parser)
    assert out == ["slim: --residual-io 'gather' is not one of "
                   "['auto', 'dense', 'index', 'pad_in', 'pad_out', 'scatter']"]
    assert _check("p3b-deploy export s --out m.onnx --int8 static", parser) == []
    assert _check("p3b-deploy export s --out m.onnx --int8 [dynamic|static] --fp16", parser) == []
    assert _check("p3b-deploy export s --out m.onnx --int8=sparse", parser) == [
        "export: --int8 'sparse' is not one of ['dynamic', 'static']"]


def test_an_unknown_deployment_target_is_reported(parser):
    assert _check("p3b-deploy run --targets ort-fp32,ort-int8,executorch-fp32", parser) == []
    assert _check("p3b-deploy bench a.onnx --report r --target openvino-int8", parser) == []
    out = _check("p3b-deploy run --targets ort-fp32,tflite-int8 --out r", parser)
    assert len(out) == 1 and out[0].startswith("run: --targets 'tflite-int8' is not one of")
    assert _check("p3b-deploy latency-table p --out t.json [--target ort-fp32|ort-int4|...]", parser)[0].startswith(
        "latency-table: --target 'ort-int4' is not one of")


def test_an_unknown_stage_and_a_command_that_does_not_parse_are_reported(parser):
    assert _check("p3b-deploy quantize model.onnx", parser)[0].startswith("unknown stage 'quantize'")
    out = _check("p3b-deploy latency-table pack/ --batch 1", parser)  # --out is required
    assert len(out) == 1 and out[0].startswith("does not parse:") and "--out" in out[0]
    assert _check("p3b-deploy bench a.onnx --report r --batch one", parser)[0].startswith("does not parse:")


def test_command_forms_continuations_and_comments(parser):
    text = """
# a comment: p3b-deploy prune --bogus
.venv/bin/p3b-deploy slim runs/r \\
    --out runs/s   # --not-a-flag in a comment
torchrun --nproc_per_node 4 -m p3b_deploy run --config c.yaml
.venv-edge/bin/python -m p3b_deploy export s --out m.onnx --format executorch && echo done
python -m p3b_deploy.cli.bench model.onnx --report out/
pip install --no-deps p3b-deploy
MPLBACKEND=Agg p3b-deploy inspect runs/r
"""
    cmds = commands_in(text, "t.md")
    assert [c.argv[0] for c in cmds] == ["slim", "run", "export", "bench", "inspect"]
    assert cmds[0].argv == ("slim", "runs/r", "--out", "runs/s") and cmds[0].source == "t.md:3"
    assert not [p for c in cmds for p in problems(c, parser)]
    renamed = text.replace("--format executorch", "--fmt executorch")
    assert _check(renamed, parser) == ["export: unknown flag --fmt"]


def test_inline_code_in_prose_is_checked_but_placeholders_pass(parser, tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Run `p3b-deploy STAGE --help`, or `p3b-deploy bench model.onnx --reprot out/`.\n"
                    "```bash\np3b-deploy serve repo --http-port 8000\n```\n", encoding="utf-8")
    cmds = commands_in_markdown(page)
    assert [(c.argv[0], c.inline) for c in cmds] == [("serve", False), ("STAGE", True), ("bench", True)]
    assert [p for c in cmds for p in problems(c, parser)] == ["bench: unknown flag --reprot"]
    assert cmds[0].source == "page.md:3"


def test_synopsis_commands_are_not_parsed_whole(parser):
    c = Command("x", "", ("slim", "r", "--out", "s", "[--round-to", "8]"))
    assert c.synopsis and problems(c, parser) == []
