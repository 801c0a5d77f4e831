from pathlib import Path

import pytest

from extauthz.sources.revocation import RevocationError, fingerprint, load_revocations


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("principals: [\n", "invalid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("principal: [a]\n", "unknown field(s) ['principal']"),
        ("principals: spiffe://a/b\n", "principals: must be a list of non-empty strings"),
        ("token_ids: ['']\n", "token_ids: must be a list of non-empty strings"),
    ],
)
def test_bad_revocation_files_are_rejected_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "revoked.yaml"
    path.write_text(text)
    with pytest.raises(RevocationError) as err:
        load_revocations(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_missing_file_is_an_error_not_an_empty_list(tmp_path: Path) -> None:
    with pytest.raises(RevocationError, match="cannot read"):
        load_revocations(tmp_path / "nope.yaml")
    assert fingerprint(tmp_path / "nope.yaml").startswith("error:")


def test_lists_and_version(tmp_path: Path) -> None:
    path = tmp_path / "revoked.yaml"
    path.write_text("principals: [spiffe://a/b]\ntoken_ids: [abc]\n")
    revoked = load_revocations(path)
    assert revoked.principals == {"spiffe://a/b"} and revoked.token_ids == {"abc"}
    assert revoked.version == fingerprint(path)
    path.write_text("{}\n")  # an explicit empty mapping is an empty list
    assert load_revocations(path).principals == frozenset()


def test_an_empty_file_mid_rewrite_keeps_the_previous_list_never_revokes_nothing(
        tmp_path: Path) -> None:
    """A reload can read the file between its truncation and its new content: an empty file
    must fail (the previous list stays), not mean "nothing is revoked"."""
    path = tmp_path / "revoked.yaml"
    for text in ("", "\n", "   \n\n"):
        path.write_text(text)
        with pytest.raises(RevocationError, match="empty"):
            load_revocations(path)
    path.write_text("principals: []\n")  # clearing the list is explicit and works
    assert load_revocations(path).principals == frozenset()
