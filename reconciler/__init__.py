"""reconciler: SQL audiences and computed traits to ChartMogul, exactly once per change."""
