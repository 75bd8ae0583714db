import pytest
import tiny


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> str:
    """A saved tiny LLaVA (fp32) with its processor, shared by the tests that only read it."""
    return tiny.save_tiny(tmp_path_factory.mktemp("tiny-llava"))
