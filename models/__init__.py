"""adactl's shipped models, as package data (`adactl.models`): the default feature draft and
its companion, the fitted estimators, the step-cost profiles of the CPU they were made on, and
the trained policies. `adactl.runtime.models.SHIPPED_MODELS` is this folder, in a checkout, an
editable install or an installed wheel alike."""
