"""The server side of the strategies whose server needs torch: SplitMix's and HeteroFL's
configs and budgets, REFT's distillation, EcoFed's tail training and dpfl's split
learning. Each one's spec is ``toolkit/strategies/<name>.py`` (light: the CLI reads it)
and names its aggregation rule here by import path, so none of these load until the
strategy is used.
"""
