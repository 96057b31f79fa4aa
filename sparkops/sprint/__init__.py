"""The sprint's numbers: metrics, the review report, the CSV and JSON export."""
