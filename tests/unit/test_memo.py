"""The one memo helper: bounded, oldest out first, owned by its user."""

from __future__ import annotations

import pytest

from extauthz.memo import Memo


def test_a_full_memo_evicts_its_oldest_entry_and_never_grows() -> None:
    memo: Memo[int, int] = Memo(3)
    for i in range(10):
        memo.put(i, i * i)
        assert len(memo) <= 3
    assert dict(memo) == {7: 49, 8: 64, 9: 81}


def test_replacing_a_key_in_a_full_memo_evicts_nothing() -> None:
    memo: Memo[str, int] = Memo(2)
    memo.put("a", 1)
    memo.put("b", 2)
    memo.put("a", 3)
    assert dict(memo) == {"a": 3, "b": 2}


def test_a_zero_sized_memo_remembers_nothing_but_still_answers() -> None:
    memo: Memo[str, int] = Memo(0)
    assert memo.put("a", 1) == 1 and memo.get_or("b", len) == 1
    assert len(memo) == 0


def test_get_or_computes_once_per_key() -> None:
    calls: list[str] = []

    def compute(key: str) -> int:
        calls.append(key)
        return len(key)

    memo: Memo[str, int] = Memo(8)
    assert [memo.get_or(k, compute) for k in ("ab", "ab", "abc", "ab")] == [2, 2, 3, 2]
    assert calls == ["ab", "abc"]


def test_a_negative_size_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        Memo(-1)


# What a check runs through. The offline tools (tools/, cli/, envoyconf/, devstack/) run once
# per command and may keep per-class registries (e.g. the doctor's validators by message type).
CHECK_PATH = ("identity", "policy", "decide", "transport", "observe", "sources", "backends",
              "app.py", "model.py", "headers.py", "memo.py", "settings.py")


def test_no_module_on_the_check_path_keeps_a_memo_as_a_global() -> None:
    """Memos belong to the object that fills them (two apps, two tests never share one)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "extauthz"
    offenders = []
    paths = [p for name in CHECK_PATH for p in (
        sorted((root / name).rglob("*.py")) if (root / name).is_dir() else [root / name])]
    assert len(paths) > 30
    for path in paths:
        for node in ast.parse(path.read_text()).body:
            value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
            name = getattr(getattr(value, "func", None), "id", "")
            empty_dict = (isinstance(value, ast.Dict) and not value.keys) or (
                isinstance(value, ast.Call) and name == "dict" and not value.args
                and not value.keywords)
            if empty_dict or name == "Memo":
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []
