"""Analyses of poisoning results as the papers define them.

`frogs`: Poison Frogs' decision-boundary angular deviation, the Fig. 3 feature
projection and outlier targets (Shafahi et al. 2018). `backdoor_tables`: Truong
et al. 2020's Tables 2-5, curves and findings from a backdoor grid's rows.
"""
