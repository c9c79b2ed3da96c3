"""Stage `poison`: the attacker's training set, and the plan that remakes it exactly.

Every later stage that reads the poisoned set remakes it from the config and checks it against
the recorded plan (`require_poison_plan`), so a change of data or code under a run is refused.
"""

from __future__ import annotations

from jaxclean import attacks, data
from jaxclean.artifacts import atomic_write_json, read_json, to_jsonable
from jaxclean.experiment import Experiment, Stage, log


def validate(config) -> None:
    data.check_source_config(config.data)
    attacks.validate_config(config.attack)


def run(exp: Experiment) -> None:
    """Poisons the training set and records the plan; refuses a plan that differs."""
    record = exp.record("poison", exp.poison_spec())
    plan_path = record.path("plan.json")
    if record.is_done():
        stored = read_json(plan_path)
        if stored != to_jsonable(exp.plan.to_json()):
            raise attacks.AttackError(
                f"the poison plan in {plan_path} differs from the one this config makes now "
                "(data or code changed?): refusing to mix them. Use a new --workdir."
            )
        log(f"poison: plan matches {plan_path} ({len(exp.plan.indices)} poisoned)")
        return
    record.claim()
    plan = exp.plan
    if exp.is_writer:
        atomic_write_json(plan_path, plan.to_json())
        record.mark_done({"num_poisoned": len(plan.indices)})
    what = (
        f"of class {plan.target} triggered, their labels kept"
        if plan.clean_label
        else f"triggered and relabelled to class {plan.target}"
    )
    cross = (
        f", {len(plan.cross_indices)} more given a noisy trigger" if len(plan.cross_indices) else ""
    )
    log(
        f"poison: {exp.config.attack.name}, {len(plan.indices)} of {len(exp.poisoned_train)} "
        f"training images {what}{cross}"
    )


def require_poison_plan(exp: Experiment) -> None:
    """Later stages use the poisoned set: make sure it is the recorded one (or record it)."""
    run(exp)


STAGE = Stage(
    "poison",
    "poisons the training set and records the plan; refuses a plan that would differ",
    run,
    validate=validate,
    result_keys=lambda config: (),
)
