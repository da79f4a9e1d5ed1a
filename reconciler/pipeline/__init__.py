"""From source rows to planned updates: snapshot, diff, guard, plan, bodies."""
