"""The fast tier loads no model: tests/conftest.py refuses a test not marked ``slow`` that would load the embedded one."""
from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).with_name("conftest.py")).read_text(encoding="utf-8")


def test_unmarked_tests_that_would_load_the_embedded_model_are_refused_before_loading(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_guarded="""
        import crosskv
        import pytest

        @pytest.fixture(scope="module")
        def essay(model32):
            return model32

        def test_requests_the_fixture(model16):
            pass

        def test_requests_it_through_another_fixture(essay):
            pass

        def test_loads_it_directly():
            crosskv.load_model("smollm2-135m", device="cpu")

        def test_random_models_are_fine():
            crosskv.load_model("random:tiny", device="cpu")
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1, errors=2)
    result.stdout.fnmatch_lines(["*test_requests_the_fixture requests the embedded model (model16)*",
                                 "*test_requests_it_through_another_fixture requests the embedded model (model32)*",
                                 "*test_loads_it_directly loads the embedded model 'smollm2-135m'*"], consecutive=False)
