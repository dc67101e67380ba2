from tally.schemas import stale_files
from tests.paths import project_root


def test_generated_schema_files_are_up_to_date() -> None:
    assert stale_files(project_root() / "schemas") == [], "run `tally schemas write`"
