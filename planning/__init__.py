"""The serving plan: what an engine does with the machine (`hardware.profile`) for a model (`model.shape`).

Pure arithmetic, no torch, no I/O. `planner.make_plan` is the entry point.
- plan: the ServingPlan / PlanOverrides structs (they cross process boundaries) and PlanError
- dtypes: dtype names, accepted spellings and sizes
- memory: byte arithmetic (weights, KV, activation peak, reserves); batch: KV room -> pool tokens, context, batch
- cpu, cpu_dtype, gpu, offload: the policies; builder: the one place a ServingPlan is built
- overrides: flags and env vars -> PlanOverrides; report: `cli.py plan`'s table and JSON
"""
