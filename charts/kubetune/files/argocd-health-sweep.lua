-- Argo CD health check for kubetune.io/FineTuneSweep.
-- Install: argocd-cm key `resource.customizations.health.kubetune.io_FineTuneSweep`
-- (see examples/gitops/argocd-cm.yaml). A sweep with trials left is Progressing.
local hs = {}
local status = obj.status
local generation = obj.metadata and obj.metadata.generation

local function condition(kind)
  if status == nil or status.conditions == nil then return nil end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then return c end
  end
  return nil
end

if status == nil or status.observedGeneration == nil
    or (generation ~= nil and status.observedGeneration < generation) then
  hs.status = "Unknown"
  hs.message = "waiting for the kubetune operator to observe generation " .. tostring(generation)
  return hs
end

local stalled = condition("Stalled")
local succeeded = condition("Succeeded")
local done = status.done or "0/?"
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = (stalled.reason or "Stalled") .. ": " .. (stalled.message or "")
elseif succeeded ~= nil and succeeded.status == "True" then
  hs.status = "Healthy"
  hs.message = "sweep finished, " .. (succeeded.message or "")
elseif obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "suspended, " .. done .. " trials ended"
else
  hs.status = "Progressing"
  hs.message = done .. " trials ended"
  if status.best ~= nil and status.best.name ~= nil then
    hs.message = hs.message .. ", best so far " .. status.best.name
  end
end
return hs
