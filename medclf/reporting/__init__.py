"""Reporting: figures (matplotlib's object API, no pyplot), HTML building blocks, the run report, the comparison page.

Nothing is imported here, so `import medclf` loads no plotting code it does not need.
"""
