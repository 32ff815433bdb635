"""The interactive session: questionary prompts and rich output over :mod:`diyapp.workflow`."""
