SELECT count(*) FROM flux_limit_report(0.8);
