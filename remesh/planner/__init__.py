"""The planner: hardware profiles, cluster descriptions, the runtime estimator, the iteration
simulator and the execution-plan search (ReaL's automatic planning)."""
