"""L4 — the budget planner (`mergelab plan`): hardware profiles, model sizes, workload, per-stage estimate, calibration."""
from mergelab.plan.calibrate import calibrate, calibrated_profile
from mergelab.plan.estimate import (DEFAULT_PASSES, METHOD_PASSES, Plan, StageEstimate, estimate_eval,
                                    estimate_finetune, estimate_merge, estimate_statistics, fmt_bytes, parse_budget,
                                    plan_recipe, plan_run)
from mergelab.plan.profiles import HARDWARE_FILE, HardwareError, Profile, get_profile, load_profiles
from mergelab.plan.sizes import ModelInfo, inspect_model, model_info_from_config
from mergelab.plan.workload import EvalWorkload, eval_workload, mean_example_tokens, statistics_workload

__all__ = ["DEFAULT_PASSES", "HARDWARE_FILE", "METHOD_PASSES", "EvalWorkload", "HardwareError", "ModelInfo", "Plan",
           "Profile", "StageEstimate", "calibrate", "calibrated_profile", "estimate_eval", "estimate_finetune",
           "estimate_merge", "estimate_statistics", "eval_workload", "fmt_bytes", "get_profile", "inspect_model",
           "load_profiles", "mean_example_tokens", "model_info_from_config", "parse_budget", "plan_recipe",
           "plan_run", "statistics_workload"]
