"""The load-test harness is run only by `make bench` and CI's smoke run; importing every
scenario here catches a renamed helper at `make test` time, not minutes into CI."""

import importlib


def test_every_scenario_imports_and_names_itself():
    scenarios = importlib.import_module("loadtests.scenarios")
    assert {"websocket", "grpc", "disconnect", "cpu_per_chunk"} <= set(scenarios.SCENARIOS)
    for key, module in scenarios.SCENARIOS.items():
        assert key == module.KEY and module.TITLE
