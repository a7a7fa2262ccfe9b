"""ConceptBench: concept suites (YAML), the runner and its report.

    from forget_me_not.bench import load_suite, run_bench
    run_bench("embedded", "world", concepts=["star"], patches=["star.safetensors"], out_dir="out")
"""

from forget_me_not.bench.runner import build_judges, run_bench
from forget_me_not.bench.suites import Suite, SuiteEntry, load_suite, parse_suite, suite_names

__all__ = ["Suite", "SuiteEntry", "build_judges", "load_suite", "parse_suite", "run_bench",
           "suite_names"]
