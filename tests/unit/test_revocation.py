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
    path.write_text("")
    assert load_revocations(path).principals == frozenset()
