"""adactl.estimators: acceptance predictors, step-time model, deadline-risk model.

Empty until the estimator issue lands; the runtime already reports everything they read
(draft probabilities, per-row acceptance, step timings) as plain data.
"""
