"""The serving plan: what an engine does with the machine (`hardware.profile`) for a model (`model.shape`).

Pure arithmetic, no torch, no I/O. `planner.make_plan` is the entry point; `plan` holds the
ServingPlan/PlanOverrides structs, `overrides` reads flags and env vars, `report` prints a plan."""
