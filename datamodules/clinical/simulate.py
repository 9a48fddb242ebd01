"""A virtual cohort of people with type 1 diabetes, simulated with the Bergman minimal model.

The glucose-insulin dynamics are Bergman's minimal model (Bergman et al. 1979; the type 1
form with exogenous insulin of Fisher 1991 / Lehmann & Deutsch 1992):

    dG/dt = -(p1 + X) G + p1 Gb + Ra(t) / V_G          plasma glucose, mg/dL
    dX/dt = -p2 X + p3 (I - Ib)                         remote insulin action, 1/min
    dI/dt = -n I + S2 / (tau_i V_I)                     plasma insulin, mU/L

Meals enter through a two-compartment gut (Q1 -> Q2 -> Ra = f Q2 / tau_m) and subcutaneous
insulin through two compartments (S1 -> S2), as in Hovorka et al. (2004). Each virtual patient
draws its own p1, p2, p3 (insulin sensitivity), basal glucose, body weight, absorption times,
carb ratio and basal-rate mismatch; days have 3-4 meals with jittered times and sizes, boluses
are sometimes missed or late. The sensor adds a physiological lag, AR(1) correlated noise and
white noise, reports every 5 minutes (with a few seconds of clock jitter), rounds to whole
mg/dL, clips to the Dexcom reporting range 40-400 mg/dL, and drops readings now and then
(short gaps the preprocessing interpolates, and rare longer ones that split a series).

Everything is vectorised over patients, so a cohort of a dozen patients over a week takes
well under a second.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

SENSOR_RANGE = (40.0, 400.0)  # Dexcom G6/G7 reporting range, mg/dL


def simulate_cohort(
    num_patients: int = 12,
    days: float = 7.0,
    seed: int = 0,
    interval_minutes: int = 5,
    noise_sd: float = 4.0,
    dropout_rate: float = 0.004,
    long_gap_rate: float = 0.02,
    start: str = "2024-01-01 00:00:00",
) -> pd.DataFrame:
    """Return the cohort as a long table: id, time, gl (mg/dL), carbs (g), insulin (U bolus)."""
    if num_patients < 1 or days <= 0:
        raise ValueError(f"simulate_cohort needs num_patients >= 1 and days > 0, got {num_patients}, {days}")
    rng = np.random.default_rng(seed)
    n = num_patients
    dt = 1.0  # minutes, Euler step
    steps = round(days * 24 * 60 / dt)

    # ---- per-patient parameters -------------------------------------------------------------
    p1 = rng.uniform(0.003, 0.012, n)             # glucose effectiveness, 1/min
    p2 = rng.uniform(0.015, 0.030, n)             # insulin action decay, 1/min
    si = rng.lognormal(np.log(6e-4), 0.3, n)      # insulin sensitivity p3/p2, L/mU/min
    p3 = si * p2
    gb = rng.uniform(110, 160, n)                 # basal glucose, mg/dL
    bw = rng.uniform(55, 95, n)                   # body weight, kg
    vg = 1.6 * bw                                 # glucose distribution volume, dL
    vi = 0.12 * bw                                # insulin distribution volume, L
    nk = rng.uniform(0.10, 0.16, n)               # insulin clearance, 1/min
    tau_i = rng.uniform(45, 75, n)                # s.c. insulin absorption time, min
    tau_m = rng.uniform(35, 60, n)                # meal absorption time, min
    bio = rng.uniform(0.8, 0.95, n)               # carbohydrate bioavailability
    basal = rng.uniform(0.6, 1.2, n) * 1000 / 60  # basal insulin, mU/min
    basal_mismatch = rng.uniform(0.85, 1.15, n)   # delivered basal vs. the basal that holds Gb
    # carb ratio (g/U) that would be right for this patient, then a personal mismatch
    icr = np.clip(rng.normal(10, 2.5, n), 5, 18)
    icr_mismatch = rng.uniform(0.8, 1.25, n)
    miss_prob = rng.uniform(0.0, 0.12, n)
    # meal schedule per patient: breakfast, lunch, dinner, optional snack (minutes after midnight)
    meal_mu = np.stack([rng.normal(m, 30, n) for m in (7.5 * 60, 12.5 * 60, 19 * 60, 22 * 60)], 1)
    meal_g = np.stack([rng.uniform(a, b, n) for a, b in ((30, 60), (45, 80), (50, 95), (10, 30))], 1)

    # ---- inputs on the 1-minute grid ----------------------------------------------------------
    carbs = np.zeros((steps, n))
    bolus = np.zeros((steps, n))
    n_days = int(np.ceil(days))
    for d in range(n_days):
        for m in range(4):
            if m == 3:
                eat = rng.random(n) < 0.4
            else:
                eat = rng.random(n) > 0.03
            t = (d * 1440 + meal_mu[:, m] + rng.normal(0, 25, n)).round().astype(int)
            g = meal_g[:, m] * rng.lognormal(0, 0.25, n)
            for i in np.flatnonzero(eat & (t >= 0) & (t < steps)):
                carbs[t[i], i] += g[i]
                if rng.random() > miss_prob[i]:
                    late = int(max(0, rng.normal(0, 10))) if rng.random() < 0.2 else 0
                    tb = min(steps - 1, t[i] + late)
                    bolus[tb, i] += round(g[i] / (icr[i] * icr_mismatch[i]) * 2) / 2  # pens dose in 0.5 U

    # ---- integrate ------------------------------------------------------------------------------
    # At the basal steady state X = 0, I = Ib = basal / (n V_I); the delivered basal is off by
    # `basal_mismatch`, which moves each patient's steady glucose away from Gb.
    ib = basal / (nk * vi)
    G = gb.copy()
    X = np.zeros(n)
    I = ib * basal_mismatch
    S1 = basal * basal_mismatch * tau_i
    S2 = S1.copy()
    Q1 = np.zeros(n)
    Q2 = np.zeros(n)
    out = np.empty((steps, n))
    # circadian variation of insulin sensitivity (dawn phenomenon): weaker in the early morning
    minute_of_day = (np.arange(steps) * dt) % 1440
    circ = 1.0 - 0.2 * np.exp(-0.5 * ((minute_of_day - 5 * 60) / 90) ** 2)
    u_basal = basal * basal_mismatch
    for k in range(steps):
        u = u_basal + bolus[k] * 1000 / dt  # mU/min
        Q1 += carbs[k] * 1000  # mg
        ra = bio * Q2 / tau_m  # mg/min
        dG = -(p1 + X) * G + p1 * gb + ra / vg
        dX = -p2 * X + p3 * circ[k] * (I - ib)
        dI = -nk * I + S2 / (tau_i * vi)
        dS1 = u - S1 / tau_i
        dS2 = (S1 - S2) / tau_i
        dQ1 = -Q1 / tau_m
        dQ2 = (Q1 - Q2) / tau_m
        G = np.maximum(G + dt * dG, 20.0)
        X = X + dt * dX
        I = np.maximum(I + dt * dI, 0.0)
        S1, S2 = S1 + dt * dS1, S2 + dt * dS2
        Q1, Q2 = Q1 + dt * dQ1, Q2 + dt * dQ2
        out[k] = G

    # ---- sensor -----------------------------------------------------------------------------
    every = int(interval_minutes / dt)
    # interstitial lag of about 8 minutes, as a first-order filter on the 1-minute signal
    lag = 8.0
    ig = np.empty_like(out)
    ig[0] = out[0]
    for k in range(1, steps):
        ig[k] = ig[k - 1] + dt / lag * (out[k] - ig[k - 1])
    samples = ig[::every]
    m = samples.shape[0]
    ar = np.zeros((m, n))
    e = rng.normal(0, noise_sd, (m, n))
    for k in range(1, m):
        ar[k] = 0.7 * ar[k - 1] + e[k]
    gl = np.clip(np.round(samples + ar + rng.normal(0, 1.0, (m, n))), *SENSOR_RANGE)

    keep = rng.random((m, n)) > dropout_rate
    for i in range(n):  # an occasional sensor outage of 1-3 hours (long_gap_rate per patient-day)
        if rng.random() < long_gap_rate * days:
            s = rng.integers(m // 4, m - 1)
            keep[s : s + rng.integers(12, 36), i] = False
    keep[0] = True

    t0 = pd.Timestamp(start)
    frames = []
    for i in range(n):
        idx = np.flatnonzero(keep[:, i])
        jitter = rng.integers(0, 3, idx.size)  # the sensor clock drifts by a few seconds
        times = t0 + pd.to_timedelta(idx * interval_minutes * 60 + jitter + rng.integers(0, 59), unit="s")
        # meals and boluses reported at the reading that follows them
        c = np.add.reduceat(carbs[:, i], np.arange(0, steps, every))[idx]
        b = np.add.reduceat(bolus[:, i], np.arange(0, steps, every))[idx]
        frames.append(pd.DataFrame({"id": f"virtual_{i + 1:03d}", "time": times, "gl": gl[idx, i],
                                    "carbs": np.round(c, 1), "insulin": np.round(b, 1)}))
    return pd.concat(frames, ignore_index=True)
