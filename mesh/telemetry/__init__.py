"""Telemetry the fleet's proxies give: Prometheus targets (targets), scraping them (scrape), the fleet's numbers
(fleet), access lines gathered over SSH (accesslog, logs) and the terminal view of the numbers (top).
"""
