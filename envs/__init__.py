"""adactl.envs: Gymnasium environments backed by the runtime.

Empty until the learned-controller issue lands.
"""
