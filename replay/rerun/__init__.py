"""Re-executing recorded steps: step plans and the replayer.
"""
