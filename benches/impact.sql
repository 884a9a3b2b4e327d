SELECT count(*) FROM flux_plan_impact('p2', 'calls', 500);
