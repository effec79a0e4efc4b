"""The one planner: what a command will run, decided and validated before anything is measured.

Every command that plans work asks here: ``bench run`` (inference and train sweeps),
``bench run --scenario serve`` and ``bench quality``. The planner

- parses a sweep from command-line values or a TOML file (``sweep_from_values``, ``load_toml``)
  and validates every value, length and path in it, so bad input is one line and exit 2 before
  a probe, a roofline or a cell has run;
- decides which (backend, precision) pairs run (``plan_targets``): each backend's default
  precision plus the reduced ones this CPU runs natively, or ``precision = "all"`` (every
  precision the backend runs here, its int8 and int4 included) or ``"fastest"`` (its int8, int4
  and native bf16, else its default), an unavailable backend or an
  unsupported precision kept as a skipped target with the reason, and a quantised checkpoint
  planned on its own backend and precision only (the others skipped, saying why);
- expands a sweep into typed cells (``plan``: ``bench.spec.CellSpec``), each with its memory
  guard estimate and roofline, the ones that cannot run marked with the reason, so they are
  stored as skipped instead of being tried.

It is two modules: ``sweeps`` (the ``Sweep``, parsing and validation) and ``cells``
(targets, cells, memory guard, rooflines); what they offer is imported here. Running the plan is ``bench.sweep.run_sweep``'s job. Imports ``bench.spec``, ``bench.models``,
``backends`` and ``model``; nothing of the harness above it.
"""

from bench.planner.cells import (BASE_PARAMETERS, MEMORY_HEADROOM, Planned, Roofline, Target,  # noqa: F401
                                 backend_option_variants, check_option_values, check_options,
                                 default_precisions, default_training_precisions, estimate_peak_bytes,
                                 estimate_train_peak_bytes, every_precision, fastest_candidates, plan, plan_targets, scenario_variants,
                                 takes_option, unavailable_reason)
from bench.planner.sweeps import (RUN_KEYS, TOML_KEYS, TRAIN_ONLY, Sweep, SweepError, all_backends,  # noqa: F401
                                  check_lengths, check_quantized_request, check_quantized_targets,
                                  check_store, expand_backends, load_toml, option_axis, option_value,
                                  parse_list, parse_options, parse_threads, sweep_from_config,
                                  sweep_from_values)
