"""The libyaml path of `agent.yamlsafe` gives exactly what the reference (pure-Python
composer) path gives: values, lines and problems, or the same YamlProblem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent import yamlsafe

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("**/*.yaml"))

SNIPPETS = [
    "a: 1\nb: [1, 2, {c: d}]\n",
    "a: 1\na: 2\nb: {x: 1, x: {y: 2}}\n",
    "a: !!int 12\nb: !!int x\nc: !!float 1\nd: !!bool yes\ne: !!str 1\nf: !!null ''\n",
    "a: !custom 1\nb: !!set {x}\nc: !!map {x: 1}\n",
    "? [1, 2]\n: v\n1: one\nnull: z\n",
    "a: ${HOME_NOT_SET_X}\nb: ${HOME_NOT_SET_X:-d}\nc: $${literal}\nd: '${SET_VAR}'\n",
    "- 010\n- 0x1F\n- 0o17\n- no\n- ~\n- .inf\n- -.Inf\n- 1e3\n- '1'\n- \"2\"\n- |\n  block\n",
    "",
    "# only a comment\n",
    "---\n",
    "a: 1\n---\nb: 2\n",
    "a: [1, 2\n",
    "a: b: c\n",
    "\t- tab\n",
    "a: &x 1\nb: *x\n",
    "a: *x\n",
    "key with spaces: value\n'quoted key': 1\n",
    "nested:\n  deeper:\n    - {a: 1, a: 2}\n    - [x, {b: !!int nope}]\n",
]


def both(text: str, monkeypatch: pytest.MonkeyPatch, lines: bool) -> tuple[Any, Any]:
    env = {"SET_VAR": "v"}

    def run() -> Any:
        try:
            return yamlsafe.load_yaml(text, env, lines=lines)
        except yamlsafe.YamlProblem as exc:
            return ("problem", exc.problems)

    fast = run()
    with monkeypatch.context() as m:
        m.setattr(yamlsafe, "_CLoader", None)
        reference = run()
    return fast, reference


@pytest.mark.skipif(yamlsafe._CLoader is None, reason="PyYAML without libyaml")
@pytest.mark.parametrize("lines", [True, False])
@pytest.mark.parametrize("text", SNIPPETS + [p.read_text() for p in CONFIGS])
def test_libyaml_path_matches_reference(
    text: str, lines: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, reference = both(text, monkeypatch, lines)
    assert repr(fast) == repr(reference)  # repr: NaN != NaN
